//! podmesh's kernel programs: one file per program, maps declared once here.
#![no_std]
#![no_main]

mod maps;
mod tunnel_egress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic; this is never linked in.
    loop {}
}

/// The kernel only loads GPL-compatible programs that call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
