//! Output helpers: human tables (comfy-table) or JSON.

use comfy_table::presets::UTF8_BORDERS_ONLY;
pub use comfy_table::Table;
use serde::Serialize;

/// A table with the given header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header.iter().copied());
    t
}

/// Prints `v` as pretty JSON.
pub fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Human size: "1.5 MiB".
pub fn size(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// Parses a human size ("64KiB", "1MiB", "4096").
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("bad size {s:?}: {e}"))
}
