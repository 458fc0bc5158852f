//! Intel MultiProcessor Specification 1.4 table: the guest kernel's source of CPUs and interrupt
//! routing when it has no ACPI (as dormouse's guest kernel). Built as bytes, checksummed.

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Upper bound on vCPUs the table can describe (APIC ids are 8 bits; the IOAPIC takes one id).
pub const MAX_CPUS: u8 = 254;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("MP table supports 1..={MAX_CPUS} vCPUs, got {0}")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, to be written at `addr`.
pub fn build(addr: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus; // APIC ids 0..num_cpus belong to the CPUs.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC feature flags
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        // Polarity and trigger "conform to bus": ISA edge-triggered, active high.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = addr + FLOATING_POINTER_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"DORMOUSE");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV);
    fp.push(0); // checksum, patched below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        for cpus in [1u8, 2, 32, MAX_CPUS] {
            let t = build(0x9fc00, cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let table_ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(table_ptr, 0x9fc10);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + 24 + 2);
            // Processor entries: the first is the bootstrap CPU, all enabled, ids in order.
            for cpu in 0..cpus as usize {
                let e = &table[HEADER_LEN + cpu * 20..];
                assert_eq!(e[0], ENTRY_PROCESSOR);
                assert_eq!(e[1] as usize, cpu);
                assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
                assert_eq!(e[3] & CPU_BOOTSTRAP != 0, cpu == 0);
            }
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert_eq!(build(0, 0), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(0, 255), Err(MpTableError::CpuCount(255)));
    }
}
