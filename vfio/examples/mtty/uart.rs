//! The UART ports of the kernel's `mtty` sample device, driven through VFIO region reads and
//! writes: one 16550-style port per BAR (`mtty-2` has BARs 0 and 1), whose TX loops back into RX.
//! Shared by `contract_vfio` and `tools/examples/vmm_control_client.rs` (included with `#[path]`).

use vfmig_vfio::{DeviceError, VfioDevice};

/// `UART_RX` / `UART_TX` and `UART_LSR` register offsets in an mtty BAR; `UART_FCR` enables the
/// FIFO; `UART_LSR_DR` says the RX FIFO holds data.
const UART_DATA: u64 = 0;
const UART_FCR: u64 = 2;
const UART_LSR: u64 = 5;
const UART_FCR_ENABLE_FIFO: u8 = 0x01;
const UART_LSR_DR: u8 = 0x01;
/// mtty's FIFO depth: a port holds at most this many bytes.
pub const FIFO: usize = 16;

/// Puts `bytes` into the RX FIFO of port `bar` (mtty loops TX back into RX).
pub fn uart_put(dev: &VfioDevice, bar: u32, bytes: &[u8]) -> Result<(), DeviceError> {
    dev.region_write(bar, UART_FCR, &[UART_FCR_ENABLE_FIFO])?;
    for b in bytes {
        dev.region_write(bar, UART_DATA, std::slice::from_ref(b))?;
    }
    Ok(())
}

/// Reads the RX FIFO of port `bar` until LSR says it is empty (at most the FIFO depth).
pub fn uart_drain(dev: &VfioDevice, bar: u32) -> Result<Vec<u8>, DeviceError> {
    let mut out = Vec::new();
    let mut lsr = [0u8];
    for _ in 0..=FIFO {
        dev.region_read(bar, UART_LSR, &mut lsr)?;
        if lsr[0] & UART_LSR_DR == 0 {
            break;
        }
        let mut b = [0u8];
        dev.region_read(bar, UART_DATA, &mut b)?;
        out.push(b[0]);
    }
    Ok(out)
}
