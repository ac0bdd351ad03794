//! The bare-LF request-head guard (agent/framing.rs) over arbitrary connection bytes: never
//! panics, and its verdict does not depend on how the bytes were split into reads (TCP gives no
//! say in that), one read, three reads at fuzzer-chosen points, or one byte at a time.
//!
//! Input: two bytes choosing the cut points, then the bytes the connection reads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_agent::framing::BareLfGuard;

/// The guard's verdict and, when every byte passed, its whole state (Debug: it has no `Eq`).
fn verdict(chunks: &[&[u8]]) -> Result<String, ()> {
    let mut g = BareLfGuard::default();
    for c in chunks {
        g.feed(c)?;
    }
    Ok(format!("{} {g:?}", g.active()))
}

fuzz_target!(|data: &[u8]| {
    let [a, b, bytes @ ..] = data else {
        return;
    };
    let n = bytes.len();
    let (i, j) = {
        let (x, y) = (usize::from(*a) * n / 255, usize::from(*b) * n / 255);
        (x.min(y), x.max(y))
    };
    let whole = verdict(&[bytes]);
    let three = verdict(&[&bytes[..i], &bytes[i..j], &bytes[j..]]);
    assert_eq!(whole, three, "split at {i} and {j} changed the verdict");
    let singles: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(whole, verdict(&singles), "one byte at a time changed the verdict");
});
