/*
 * copy_floor: single-threaded kernel work per GiB on a file system (tmpfs: /dev/shm), the floor
 * under any sender or receiver of file-backed state (docs/BENCHMARKS.md, "The floor on this
 * machine").
 *
 *   gcc -O2 -o copy_floor benches/floor/copy_floor.c
 *   head -c 1G /dev/urandom > /dev/shm/in
 *   ./copy_floor MODE PATH MIB [BUFFERS]
 *
 * MODE: read    pread 1 MiB at a time into BUFFERS rotating buffers, read every cache line
 *       mmapr   mmap, MADV_POPULATE_READ per 16 MiB, read every cache line (no copy)
 *       mmaprc  as mmapr, and copy each MiB into a buffer
 *       write   pwrite 1 MiB at a time to a new file (PATH is created/truncated), fsync
 *       mmapw   ftruncate + MAP_SHARED mapping of a new file, memcpy 1 MiB at a time
 *       mmapwp  as mmapw, with MADV_POPULATE_WRITE per 16 MiB first
 * Prints wall and CPU (user + sys) seconds.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <stdint.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif
#define MB (1<<20)
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static double cpu(){struct rusage r;getrusage(RUSAGE_SELF,&r);return r.ru_utime.tv_sec+r.ru_utime.tv_usec/1e6+r.ru_stime.tv_sec+r.ru_stime.tv_usec/1e6;}
static uint64_t sum(const uint64_t*p,size_t n){uint64_t s=0;for(size_t i=0;i<n/8;i+=8)s+=p[i];return s;}
int main(int argc,char**argv){
  const char*mode=argv[1]; const char*path=argv[2]; size_t size=(size_t)atol(argv[3])*MB;
  int nbuf=argc>4?atoi(argv[4]):1;
  char*bufs=aligned_alloc(4096,(size_t)nbuf*MB); memset(bufs,1,(size_t)nbuf*MB);
  double t0=now(),c0=cpu(); uint64_t s=0;
  if(!strcmp(mode,"read")){int fd=open(path,O_RDONLY);for(size_t o=0;o<size;o+=MB){char*b=bufs+(o/MB%nbuf)*MB;pread(fd,b,MB,o);s+=sum((void*)b,MB);}}
  else if(!strcmp(mode,"mmapr")){int fd=open(path,O_RDONLY);char*m=mmap(0,size,PROT_READ,MAP_SHARED,fd,0);
    for(size_t o=0;o<size;o+=16*MB){madvise(m+o,16*MB,MADV_POPULATE_READ);for(size_t p=o;p<o+16*MB;p+=MB)s+=sum((void*)(m+p),MB);} }
  else if(!strcmp(mode,"mmaprc")){int fd=open(path,O_RDONLY);char*m=mmap(0,size,PROT_READ,MAP_SHARED,fd,0);
    for(size_t o=0;o<size;o+=16*MB){madvise(m+o,16*MB,MADV_POPULATE_READ);for(size_t p=o;p<o+16*MB;p+=MB){char*b=bufs+(p/MB%nbuf)*MB;memcpy(b,m+p,MB);s+=sum((void*)b,MB);}} }
  else if(!strcmp(mode,"write")){int fd=open(path,O_WRONLY|O_CREAT|O_TRUNC,0644);for(size_t o=0;o<size;o+=MB){char*b=bufs+(o/MB%nbuf)*MB;pwrite(fd,b,MB,o);}fsync(fd);}
  else if(!strcmp(mode,"mmapw")||!strcmp(mode,"mmapwp")){int fd=open(path,O_RDWR|O_CREAT|O_TRUNC,0644);ftruncate(fd,size);char*m=mmap(0,size,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);
    for(size_t o=0;o<size;o+=16*MB){if(mode[5]=='p')madvise(m+o,16*MB,MADV_POPULATE_WRITE);for(size_t p=o;p<o+16*MB;p+=MB){char*b=bufs+(p/MB%nbuf)*MB;memcpy(m+p,b,MB);}}munmap(m,size);fsync(fd);}
  printf("%s %zu MiB nbuf=%d: wall %.3f s cpu %.3f s (%lu)\n",mode,size/MB,nbuf,now()-t0,cpu()-c0,(unsigned long)(s&1));
}
