/* dormouse's hostile test guest: a freestanding 64-bit program that drives the VMM's virtio-mmio
 * devices with invalid input and reports each case on the serial port. See docs/hostile-guest.md.
 *
 * Entered by dormouse's direct boot: long mode, ring 0, interrupts off, the first GiB
 * identity-mapped, RSI = the zero page. Never halts (a HLT exit ends the VM); ends with the i8042
 * reset (0x64 <- 0xfe). No SSE (CR4.OSFXSR is off): built with -mgeneral-regs-only. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define PAGE 4096UL
#define MMIO_BASE 0xd0000000UL
#define MMIO_WINDOW 0x1000UL
#define SLOTS 32
#define QS 16 /* the size every well-behaved queue gets */

/* virtio-mmio registers (virtio 1.2, 4.2.2) */
#define R_MAGIC 0x000
#define R_DEVICE_ID 0x008
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_NEXT 1
#define F_WRITE 2

#define COM1 0x3f8

/* ---------------------------------------------------------------- low level */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void w64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u8 r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 r32(u64 a) { return *(volatile u32 *)a; }
static inline u64 r64(u64 a) { return *(volatile u64 *)a; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

void *memset(void *d, int c, u64 n) {
	u8 *p = d;
	while (n--) *p++ = (u8)c;
	return d;
}
void *memcpy(void *d, const void *s, u64 n) {
	u8 *p = d;
	const u8 *q = s;
	while (n--) *p++ = *q++;
	return d;
}

static void serial_putc(char c) { outb(COM1, (u8)c); }
static void serial_puts(const char *s) { while (*s) serial_putc(*s++); }
static void puthex(u64 v) {
	char buf[17];
	int i = 16;
	buf[16] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v && i > 0);
	serial_puts("0x");
	serial_puts(buf + i);
}
static void putdec(u64 v) {
	char buf[21];
	int i = 20;
	buf[20] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	serial_puts(buf + i);
}

static void reset_vm(void) {
	for (;;) outb(0x64, 0xfe);
}

static u64 rng_state = 0x9e3779b97f4a7c15UL;
static u64 rnd(void) { /* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dUL;
}

/* ---------------------------------------------------------------- memory */

extern u64 boot_zero_page;
static u64 mem_end; /* end of the RAM range that holds this image */

/* Page directory mapping GiB 3 (0xc000_0000..) with 2 MiB uncached pages: the device windows. */
static u64 pd_mmio[512] __attribute__((aligned(4096)));

#define BOOT_PDPT 0xa000UL

static void map_mmio_hole(void) {
	for (u64 i = 0; i < 512; i++) pd_mmio[i] = (0xc0000000UL + (i << 21)) | 0x9b; /* P RW PWT PCD PS */
	w64(BOOT_PDPT + 3 * 8, (u64)pd_mmio | 3);
	__asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

static void find_mem_end(void) {
	u8 n = r8(boot_zero_page + 0x1e8);
	for (u8 i = 0; i < n && i < 128; i++) {
		u64 e = boot_zero_page + 0x2d0 + 20UL * i;
		u64 addr = r64(e), size = r64(e + 8);
		u32 type = r32(e + 16);
		if (type == 1 && addr <= 0x100000 && addr + size > mem_end) mem_end = addr + size;
	}
}

/* Rings: three pages per queue (descriptors, available, used), up to 4 queues. */
struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
static u8 rings[4][3][PAGE] __attribute__((aligned(4096)));
static u8 bufs[8][PAGE] __attribute__((aligned(4096)));
static u16 avail_idx[4];

static struct desc *descs(int q) { return (struct desc *)rings[q][0]; }
static u64 avail(int q) { return (u64)rings[q][1]; }
static u64 used(int q) { return (u64)rings[q][2]; }
static u16 used_idx(int q) { return r16(used(q) + 2); }

static void set_desc(int q, u16 i, u64 addr, u32 len, u16 flags, u16 next) {
	struct desc *d = &descs(q)[i % QS];
	d->addr = addr;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

/* Offers chain `head` on queue q (ring of QS entries). */
static void post(int q, u16 head) {
	w16(avail(q) + 4 + 2 * (avail_idx[q] % QS), head);
	barrier();
	avail_idx[q]++;
	w16(avail(q) + 2, avail_idx[q]);
	barrier();
}

/* ---------------------------------------------------------------- devices */

#define ID_NET 1
#define ID_BLK 2
#define ID_VSOCK 19

struct dev {
	u64 base;
	u32 id;
	u32 nq;
	u32 qmax[4];
	int txq; /* the queue the driver fills with device-readable requests */
	int rxq; /* a queue of device-writable buffers, or -1 */
	const char *name;
};
static struct dev devs[8];
static int ndevs;
static int cases;
static int failures;

static u32 status(struct dev *d) { return r32(d->base + R_STATUS); }
static void set_status(struct dev *d, u32 s) { w32(d->base + R_STATUS, s); }
static void notify(struct dev *d, int q) { w32(d->base + R_QUEUE_NOTIFY, (u32)q); }

/* Device reset, then ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK. */
static int begin(struct dev *d) {
	set_status(d, 0);
	for (int q = 0; q < 4; q++)
		for (int p = 0; p < 3; p++) memset(rings[q][p], 0, 16 * QS + 8);
	for (int q = 0; q < 4; q++) avail_idx[q] = 0;
	w32(d->base + R_INT_ACK, 3);
	set_status(d, S_ACK);
	set_status(d, S_ACK | S_DRIVER);
	w32(d->base + R_DRV_FEATURES_SEL, 1);
	w32(d->base + R_DRV_FEATURES, 1); /* bit 32: VIRTIO_F_VERSION_1 */
	w32(d->base + R_DRV_FEATURES_SEL, 0);
	w32(d->base + R_DRV_FEATURES, 0);
	set_status(d, S_ACK | S_DRIVER | S_FEATURES_OK);
	return (status(d) & S_FEATURES_OK) != 0;
}

static void setup_queue(struct dev *d, int q, u32 size) {
	w32(d->base + R_QUEUE_SEL, (u32)q);
	w32(d->base + R_QUEUE_NUM, size);
	w32(d->base + R_QUEUE_DESC, (u32)(u64)rings[q][0]);
	w32(d->base + R_QUEUE_DESC + 4, 0);
	w32(d->base + R_QUEUE_DRIVER, (u32)(u64)rings[q][1]);
	w32(d->base + R_QUEUE_DRIVER + 4, 0);
	w32(d->base + R_QUEUE_DEVICE, (u32)(u64)rings[q][2]);
	w32(d->base + R_QUEUE_DEVICE + 4, 0);
	w32(d->base + R_QUEUE_READY, 1);
}

/* A complete, well-behaved initialisation; true if the device reached DRIVER_OK. */
static int full_init(struct dev *d) {
	if (!begin(d)) return 0;
	for (u32 q = 0; q < d->nq; q++) setup_queue(d, (int)q, QS);
	set_status(d, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	return status(d) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Spins (each round one MMIO exit, which gives the device thread time) until queue q's used
 * index reaches `target`. */
static int wait_used(struct dev *d, int q, u16 target, u32 rounds) {
	for (u32 i = 0; i < rounds; i++) {
		if (used_idx(q) == target) return 1;
		(void)status(d);
	}
	return used_idx(q) == target;
}

static int wait_needs_reset(struct dev *d, u32 rounds) {
	for (u32 i = 0; i < rounds; i++)
		if (status(d) & S_NEEDS_RESET) return 1;
	return 0;
}

/* Descriptors the probe request uses: the last ones of the table, clear of the cases' own. */
#define PROBE_DESC (QS - 3)

/* Fills buffer 7 and descriptors PROBE_DESC.. with one valid request on the tx queue. */
static void build_probe(struct dev *d) {
	u64 b = (u64)bufs[7];
	int q = d->txq;
	memset(bufs[7], 0, 0x100);
	if (d->id == ID_BLK) {
		w32(b, 8); /* VIRTIO_BLK_T_GET_ID */
		w8(b + 0x80, 0xff);
		set_desc(q, PROBE_DESC, b, 16, F_NEXT, PROBE_DESC + 1);
		set_desc(q, PROBE_DESC + 1, b + 0x40, 20, F_NEXT | F_WRITE, PROBE_DESC + 2);
		set_desc(q, PROBE_DESC + 2, b + 0x80, 1, F_WRITE, 0);
	} else if (d->id == ID_NET) {
		/* 12-byte virtio-net header, then a broadcast Ethernet frame. */
		for (int i = 0; i < 6; i++) w8(b + 12 + i, 0xff);
		w8(b + 18, 0x02);
		w8(b + 24, 0x88);
		w8(b + 25, 0xb5); /* local experimental ethertype */
		set_desc(q, PROBE_DESC, b, 12 + 60, 0, 0);
	} else {
		/* vsock RST from guest CID 3 to host port 5678: the muxer swallows it. */
		w64(b, 3);
		w64(b + 8, 2);
		w32(b + 16, 1234);
		w32(b + 20, 5678);
		w16(b + 28, 1); /* stream */
		w16(b + 30, 3); /* RST */
		set_desc(q, PROBE_DESC, b, 44, 0, 0);
	}
}

/* Sends the probe and waits for it; true if the device completed it (and, for blk, said OK). */
static int probe(struct dev *d, u32 rounds) {
	int q = d->txq;
	build_probe(d);
	u16 target = (u16)(used_idx(q) + 1);
	post(q, PROBE_DESC);
	notify(d, q);
	if (!wait_used(d, q, target, rounds)) return 0;
	if (d->id == ID_BLK && r8((u64)bufs[7] + 0x80) != 0) return 0;
	return 1;
}

/* After a case: reset, the device must come back to a clean state and work. */
static int recovers(struct dev *d) {
	set_status(d, 0);
	if (status(d) != 0) return 0;
	if (r32(d->base + R_MAGIC) != 0x74726976) return 0;
	return full_init(d) && probe(d, 200000);
}

static void report(const char *dev, const char *name, int ok, u32 st, const char *why) {
	cases++;
	serial_puts("HOSTILE case ");
	putdec((u64)cases);
	serial_putc(' ');
	serial_puts(dev);
	serial_putc('/');
	serial_puts(name);
	serial_puts(ok ? " ok" : " FAIL");
	serial_puts(" status=");
	puthex(st);
	if (!ok) {
		failures++;
		serial_puts(" why=");
		serial_puts(why);
	}
	serial_putc('\n');
}

#define EXPECT(cond, why)                                                                          \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			report(d->name, name, 0, st, why);                                         \
			return;                                                                    \
		}                                                                                  \
	} while (0)

/* ---------------------------------------------------------------- cases */

/* QueueNum the driver may not write: DRIVER_OK must be refused and NEEDS_RESET set. */
static void case_bad_size(struct dev *d, const char *name, u32 size) {
	u32 st = 0;
	EXPECT(begin(d), "features-not-accepted");
	for (u32 q = 0; q < d->nq; q++) setup_queue(d, (int)q, q == (u32)d->txq ? size : QS);
	set_status(d, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	st = status(d);
	EXPECT(st & S_NEEDS_RESET, "no-needs-reset");
	EXPECT(!(st & S_DRIVER_OK), "driver-ok-accepted");
	EXPECT(recovers(d), "no-recovery");
	report(d->name, name, 1, st, "");
}

/* A ring the device cannot process: NEEDS_RESET, later requests ignored, then a reset heals. */
static void broken_ring_case(struct dev *d, const char *name, int kind) {
	u32 st = 0;
	int q = d->txq;
	u64 b = (u64)bufs[0];
	EXPECT(full_init(d), "init");
	switch (kind) {
	case 0: /* descriptor loop 0 -> 1 -> 0 */
		set_desc(q, 0, b, 16, F_NEXT, 1);
		set_desc(q, 1, b + 16, 16, F_NEXT, 0);
		post(q, 0);
		break;
	case 1: /* every descriptor says "next": a chain longer than the queue */
		for (u16 i = 0; i < QS; i++) set_desc(q, i, b, 16, F_NEXT, (u16)((i + 1) % QS));
		post(q, 0);
		break;
	case 2: /* next index outside the table */
		set_desc(q, 0, b, 16, F_NEXT, 0xffff);
		post(q, 0);
		break;
	case 3: /* head index outside the table */
		post(q, QS + 3);
		break;
	case 4: /* available index a queue and more ahead */
		avail_idx[q] = QS + 7;
		w16(avail(q) + 2, avail_idx[q]);
		barrier();
		break;
	case 5: /* lengths summing past 2^32 */
		set_desc(q, 0, b, 0x80000000U, F_NEXT, 1);
		set_desc(q, 1, b, 0x80000000U, 0, 0);
		post(q, 0);
		break;
	}
	notify(d, q);
	EXPECT(wait_needs_reset(d, 200000), "no-needs-reset");
	st = status(d);
	/* The device stopped: a valid request on the broken ring is not served. */
	u16 before = used_idx(q);
	build_probe(d);
	post(q, PROBE_DESC);
	notify(d, q);
	EXPECT(!wait_used(d, q, (u16)(before + 1), 3000), "served-after-needs-reset");
	EXPECT(recovers(d), "no-recovery");
	report(d->name, name, 1, st, "");
}

/* A request that is wrong but leaves the ring intact: answered or dropped, never NEEDS_RESET. */
static void bad_request_case(struct dev *d, const char *name, int kind) {
	u32 st = 0;
	int q = d->txq;
	u64 b = (u64)bufs[0];
	u64 far = 0xfff000000000UL; /* far outside guest memory */
	u64 edge = mem_end - 8;     /* straddles the end of RAM */
	int posted = 0;
	EXPECT(full_init(d), "init");
	memset(bufs[0], 0, 0x900);
	w32(b, 0); /* blk: VIRTIO_BLK_T_IN of sector 0 */
	for (int n = 0; n < 3; n++) {
		u16 i = (u16)(n * 3);
		u64 addr = kind == 0 ? far : kind == 1 ? edge : b;
		/* Huge, but a chain's total stays below 2^32 (past it the ring itself is broken:
		 * lengths-overflow-u32); a lone descriptor gets the full u32::MAX. */
		u32 len = kind == 2 ? 0xfffff000U : 64;
		if (d->id != ID_BLK && n == 0 && kind == 2) len = 0xffffffffU;
		if (d->id == ID_BLK) {
			/* n = 0: header bad; 1: data bad; 2: status bad */
			set_desc(q, i, n == 0 ? addr : b, n == 0 ? len : 16, F_NEXT, i + 1);
			set_desc(q, i + 1, n == 1 ? addr : b + 0x200, n == 1 ? len : 512, F_NEXT | F_WRITE, i + 2);
			set_desc(q, i + 2, n == 2 ? addr : b + 0x800, n == 2 ? len : 1, F_WRITE, 0);
		} else {
			set_desc(q, i, n == 0 ? addr : b, n == 0 ? len : 44, n == 0 ? 0 : F_NEXT, i + 1);
			set_desc(q, i + 1, addr, len, 0, 0);
		}
		post(q, i);
		posted++;
	}
	if (kind == 2 && d->id == ID_BLK) {
		/* One writable descriptor of u32::MAX bytes: its last byte (the status) is past RAM. */
		set_desc(q, 9, b, 0xffffffffU, F_WRITE, 0);
		post(q, 9);
		posted++;
	}
	notify(d, q);
	wait_used(d, q, (u16)posted, 200000);
	st = status(d);
	EXPECT(!(st & S_NEEDS_RESET), "needs-reset-for-a-bad-request");
	EXPECT(used_idx(q) == (u16)posted, "requests-not-returned");
	EXPECT(probe(d, 200000), "device-stopped");
	st = status(d);
	report(d->name, name, 1, st, "");
}

/* Device-writable where the device must read and the reverse. */
static void wrong_direction_case(struct dev *d, const char *name) {
	u32 st = 0;
	int q = d->txq;
	u64 b = (u64)bufs[0];
	EXPECT(full_init(d), "init");
	memset(bufs[0], 0, 0x900);
	if (d->id == ID_BLK) {
		/* IN request whose data and status are read-only; OUT whose header is writable. */
		set_desc(q, 0, b, 16, F_NEXT, 1);
		set_desc(q, 1, b + 0x200, 512, F_NEXT, 2);
		set_desc(q, 2, b + 0x800, 1, 0, 0);
		post(q, 0);
		w32(b + 0x400, 1);
		set_desc(q, 3, b + 0x400, 16, F_NEXT | F_WRITE, 4);
		set_desc(q, 4, b + 0x200, 512, F_NEXT | F_WRITE, 5);
		set_desc(q, 5, b + 0x801, 1, F_WRITE, 0);
		post(q, 3);
	} else {
		/* TX buffers the device may only write. */
		set_desc(q, 0, b, 44, F_WRITE | F_NEXT, 1);
		set_desc(q, 1, b + 0x100, 64, F_WRITE, 0);
		post(q, 0);
		set_desc(q, 2, b, 72, F_WRITE, 0);
		post(q, 2);
	}
	notify(d, q);
	wait_used(d, q, 2, 200000);
	st = status(d);
	EXPECT(!(st & S_NEEDS_RESET), "needs-reset-for-a-bad-request");
	EXPECT(used_idx(q) == 2, "requests-not-returned");
	if (d->rxq >= 0) {
		/* RX buffers the device may only read: nothing to check but survival. */
		for (u16 i = 0; i < 4; i++) {
			set_desc(d->rxq, i, (u64)bufs[1] + 0x400 * i, 0x400, 0, 0);
			post(d->rxq, i);
		}
		notify(d, d->rxq);
	}
	EXPECT(probe(d, 200000), "device-stopped");
	st = status(d);
	report(d->name, name, 1, st, "");
}

/* Thousands of QUEUE_NOTIFY writes, to real and unknown queues, in every size. */
static void notify_storm_case(struct dev *d, const char *name) {
	u32 st = 0;
	EXPECT(full_init(d), "init");
	for (u32 i = 0; i < 4000; i++) {
		u32 q = i % (d->nq + 2);
		switch (i % 4) {
		case 0: w32(d->base + R_QUEUE_NOTIFY, q); break;
		case 1: w32(d->base + R_QUEUE_NOTIFY, q | 0xffff0000U); break;
		case 2: w16(d->base + R_QUEUE_NOTIFY, (u16)q); break;
		default: w8(d->base + R_QUEUE_NOTIFY, (u8)q); break;
		}
	}
	st = status(d);
	EXPECT(!(st & S_NEEDS_RESET), "needs-reset-after-notifies");
	EXPECT(probe(d, 200000), "device-stopped");
	report(d->name, name, 1, st, "");
}

/* Reset while requests are in flight; the device must come back clean. */
static void reset_mid_request_case(struct dev *d, const char *name) {
	u32 st = 0;
	int q = d->txq;
	EXPECT(full_init(d), "init");
	build_probe(d);
	for (int i = 0; i < 8; i++) post(q, PROBE_DESC);
	notify(d, q);
	set_status(d, 0);
	st = status(d);
	EXPECT(st == 0, "reset-not-complete");
	EXPECT(recovers(d), "no-recovery");
	st = status(d);
	EXPECT(!(st & S_NEEDS_RESET), "needs-reset-after-reset");
	report(d->name, name, 1, st, "");
}

static const u64 sweep_values[2] = {0, 0xffffffffffffffffUL};

/* Every register and config offset, written and read with every size. */
static void register_sweep_case(struct dev *d, const char *name) {
	u32 st = 0;
	u64 sum = 0;
	EXPECT(full_init(d), "init");
	for (u64 off = 0; off < 0x200; off++) {
		for (int v = 0; v < 3; v++) {
			u64 val = v == 2 ? rnd() : sweep_values[v];
			u64 a = d->base + off;
			w8(a, (u8)val);
			if (off + 2 <= MMIO_WINDOW) w16(a, (u16)val);
			if (off + 4 <= MMIO_WINDOW) w32(a, (u32)val);
			if (off + 8 <= MMIO_WINDOW) w64(a, val);
		}
		sum += r8(d->base + off) + r16(d->base + off) + r32(d->base + off) + r64(d->base + off);
	}
	for (u64 off = 0x200; off < MMIO_WINDOW; off += 4) {
		w32(d->base + off, (u32)rnd());
		sum += r32(d->base + off);
		if (off % 8 == 0) {
			w64(d->base + off, rnd());
			sum += r64(d->base + off);
		}
	}
	/* The last bytes of the window with accesses running past its end. */
	w64(d->base + MMIO_WINDOW - 4, rnd());
	sum += r64(d->base + MMIO_WINDOW - 2);
	(void)sum;
	st = status(d);
	EXPECT(recovers(d), "no-recovery");
	report(d->name, name, 1, st, "");
}

static void run_device_cases(struct dev *d) {
	u32 max = d->qmax[d->txq];
	case_bad_size(d, "queue-size-0", 0);
	case_bad_size(d, "queue-size-not-power-of-two", QS - 3);
	case_bad_size(d, "queue-size-above-max", max * 2 > 0xffff ? 0x10000 : max * 2);
	broken_ring_case(d, "descriptor-loop", 0);
	broken_ring_case(d, "chain-longer-than-queue", 1);
	broken_ring_case(d, "next-index-out-of-range", 2);
	broken_ring_case(d, "head-index-out-of-range", 3);
	broken_ring_case(d, "avail-index-too-far-ahead", 4);
	broken_ring_case(d, "lengths-overflow-u32", 5);
	bad_request_case(d, "buffers-outside-memory", 0);
	bad_request_case(d, "buffers-straddle-memory-end", 1);
	bad_request_case(d, "length-u32-max", 2);
	wrong_direction_case(d, "wrong-direction");
	notify_storm_case(d, "notify-storm");
	reset_mid_request_case(d, "reset-mid-request");
	register_sweep_case(d, "register-sweep");
	set_status(d, 0);
}

/* ---------------------------------------------------------------- global cases */

static void mmio_unmapped_case(void) {
	u64 first_free = MMIO_BASE + (u64)ndevs * MMIO_WINDOW;
	u64 targets[] = {first_free, first_free + 0x50, first_free + 0xff8, MMIO_BASE + 0xff000,
			 0xc0000000UL, 0xcffff000UL, 0xdffffff8UL, mem_end, mem_end + 0x1000};
	u64 sum = 0;
	for (u64 i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
		u64 a = targets[i];
		if (a < 0x40000000UL && a < mem_end) continue;
		for (int k = 0; k < 64; k++) {
			u64 at = a + (u64)k * 8;
			w8(at, 0xaa);
			w16(at, 0xbbbb);
			w32(at, 0xcccccccc);
			w64(at, rnd());
			sum += r8(at) + r16(at) + r32(at) + r64(at);
		}
	}
	(void)sum;
	/* The devices still answer. */
	int ok = 1;
	for (int i = 0; i < ndevs; i++)
		if (r32(devs[i].base + R_MAGIC) != 0x74726976) ok = 0;
	report("vmm", "mmio-unmapped", ok, 0, "device-window-gone");
}

static int port_forbidden(u32 port, u32 size) {
	/* The i8042 (0x64 <- 0xfe resets) and the serial port this guest reports on. */
	u32 end = port + size;
	if (port < 0x65 && end > 0x60) return 1;
	if (port < 0x400 && end > 0x3f8) return 1;
	return 0;
}

static void port_io_case(void) {
	u32 done = 0;
	u64 sum = 0;
	while (done < 4000) {
		u64 r = rnd();
		u32 port = (u32)(r & 0xffff);
		u32 size = 1U << ((r >> 16) % 3);
		int write = (r >> 20) & 1;
		u32 val = (u32)(r >> 32);
		if (port + size > 0x10000 || port_forbidden(port, size)) continue;
		if (write) {
			if (size == 1) outb((u16)port, (u8)val);
			else if (size == 2) outw((u16)port, (u16)val);
			else outl((u16)port, val);
		} else {
			if (size == 1) sum += inb((u16)port);
			else if (size == 2) sum += inw((u16)port);
			else sum += inl((u16)port);
		}
		done++;
	}
	(void)sum;
	report("vmm", "random-port-io", 1, 0, "");
}

/* Waits for one byte on the console (the test sends it after asking the API): the VMM must still
 * serve both directions of the console. */
static void console_input_case(void) {
	serial_puts("HOSTILE waiting for console input\n");
	for (u64 i = 0; i < 2000000UL; i++) {
		if (inb(COM1 + 5) & 1) {
			u8 c = inb(COM1);
			report("vmm", "console-input", c == 'g', c, "unexpected-byte");
			return;
		}
	}
	report("vmm", "console-input", 0, 0, "timeout");
}

/* ---------------------------------------------------------------- main */

static void discover(void) {
	for (int slot = 0; slot < SLOTS && ndevs < 8; slot++) {
		u64 base = MMIO_BASE + (u64)slot * MMIO_WINDOW;
		if (r32(base + R_MAGIC) != 0x74726976) break;
		struct dev *d = &devs[ndevs++];
		d->base = base;
		d->id = r32(base + R_DEVICE_ID);
		d->nq = 0;
		for (u32 q = 0; q < 4; q++) {
			w32(base + R_QUEUE_SEL, q);
			d->qmax[q] = r32(base + R_QUEUE_NUM_MAX);
			if (d->qmax[q] == 0) break;
			d->nq++;
		}
		d->txq = d->id == ID_BLK ? 0 : 1;
		d->rxq = d->id == ID_BLK ? -1 : 0;
		d->name = d->id == ID_BLK ? "blk" : d->id == ID_NET ? "net" : d->id == ID_VSOCK ? "vsock" : "other";
		serial_puts("HOSTILE device ");
		serial_puts(d->name);
		serial_puts(" at ");
		puthex(base);
		serial_puts(" queues=");
		putdec(d->nq);
		serial_puts(" max=");
		putdec(d->qmax[0]);
		serial_putc('\n');
	}
}

void hostile_main(void) {
	serial_puts("HOSTILE start\n");
	map_mmio_hole();
	find_mem_end();
	serial_puts("HOSTILE memory end ");
	puthex(mem_end);
	serial_putc('\n');
	discover();
	for (int i = 0; i < ndevs; i++) {
		struct dev *d = &devs[i];
		if (d->id != ID_BLK && d->id != ID_NET && d->id != ID_VSOCK) continue;
		if (d->nq <= (u32)d->txq || d->qmax[d->txq] < QS) continue;
		run_device_cases(d);
	}
	mmio_unmapped_case();
	port_io_case();
	console_input_case();
	serial_puts("HOSTILE done ");
	putdec((u64)cases);
	serial_puts(" failures=");
	putdec((u64)failures);
	serial_putc('\n');
	reset_vm();
}

u8 hostile_stack[16384] __attribute__((aligned(16)));
u64 boot_zero_page;

/* Entry: keep the zero page pointer, switch to our own stack (the boot stack is a few hundred
 * bytes under the zero page), run. */
__attribute__((naked, section(".text.start"))) void _start(void) {
	__asm__("mov %rsi, boot_zero_page(%rip)\n"
		"lea hostile_stack+16384(%rip), %rsp\n"
		"call hostile_main\n"
		"1: jmp 1b\n");
}
