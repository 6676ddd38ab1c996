#!/usr/bin/env python3
"""A VMM's side of vfmig's control socket (docs/CONTROL.md), in 70 lines of Python.

Migrates a file the "VMM" holds open, over loopback, with both vfmig processes driven through
their control sockets. The fds travel with SCM_RIGHTS; the bytes land in the destination file
this script opened. Run from the repository root after `cargo build --release -p vfmig`:

    python3 tools/examples/control_client.py [path/to/vfmig]

Prints every line on the wire (">" sent, "<" received).
"""
import json, os, socket, subprocess, sys, tempfile

VFMIG = sys.argv[1] if len(sys.argv) > 1 else "target/release/vfmig"


class Control:
    def __init__(self, path, name):
        self.sock, self.name, self.buf = socket.socket(socket.AF_UNIX), name, b""
        self.sock.connect(path)
        self.sock.settimeout(60)
        self.line()  # the greeting

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.name)
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        print(f"{self.name} < {raw.decode()}")
        return json.loads(raw)

    def execute(self, cmd, fds=(), **arguments):
        msg = {"execute": cmd, "arguments": arguments, "id": cmd}
        raw = json.dumps(msg).encode() + b"\n"
        print(f"{self.name} > {raw.decode().strip()}" + (f"   [+{len(fds)} fd]" if fds else ""))
        socket.send_fds(self.sock, [raw], list(fds))
        while True:
            reply = self.line()
            if "event" not in reply:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["return"]

    def wait(self, event):
        while self.line().get("event") != event:
            pass


def spawn(args, sock):
    p = subprocess.Popen([VFMIG, *args, "--control", f"unix:{sock}"], stderr=subprocess.PIPE, text=True)
    listening = None
    for line in p.stderr:
        if line.startswith("vfmig: listening on "):
            listening = line.split()[-1]
        if line.startswith("vfmig: control socket at "):
            return p, listening


with tempfile.TemporaryDirectory() as d:
    key = os.path.join(d, "key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("an example pre-shared key, 32+ bytes")
    state = os.urandom(1 << 20)
    with open(os.path.join(d, "src.bin"), "wb") as f:
        f.write(state)
    src_fd = os.open(os.path.join(d, "src.bin"), os.O_RDONLY)
    dst_fd = os.open(os.path.join(d, "dst.bin"), os.O_RDWR | os.O_CREAT, 0o600)

    recv, addr = spawn(["recv", "--listen", "127.0.0.1:0", "--psk-file", key], f"{d}/dst.sock")
    send, _ = spawn(["send", "--connect", addr, "--psk-file", key], f"{d}/src.sock")
    dst, src = Control(f"{d}/dst.sock", "dst"), Control(f"{d}/src.sock", "src")

    dst.execute("add-device", [dst_fd], kind="file", name="state")
    dst.execute("start")
    src.execute("add-device", [src_fd], kind="file", name="state")
    src.execute("start")
    src.execute("status")
    src.execute("switchover")  # the VMM paused its vCPUs first
    dst.wait("committed")      # the VMM loads its RAM, resumes the device, then says so
    dst.execute("resumed")
    src.wait("completed")
    dst.wait("completed")
    src.execute("quit")
    dst.execute("quit")
    assert send.wait() == 0 and recv.wait() == 0
    assert os.pread(dst_fd, len(state) + 1, 0) == state
    print("the destination file holds the source's bytes")
