//! `teletun keygen`.

use std::path::Path;

use anyhow::Result;

/// Writes a new key pair and says where.
pub fn run(prefix: &Path) -> Result<()> {
    let (key, public) = crate::keys::generate(prefix)?;
    println!(
        "wrote {} (private, keep it secret) and {} (public, give it to the peer)",
        key.display(),
        public.display()
    );
    Ok(())
}
