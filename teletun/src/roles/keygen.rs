//! `teletun keygen`.

use std::path::Path;

use anyhow::Result;

/// Writes a new key pair (or with `link`, a link key) and says where.
pub fn run(prefix: &Path, link: bool) -> Result<()> {
    if link {
        let key = crate::keys::generate_link_key(prefix)?;
        println!(
            "wrote {} (the link key: keep it secret, give it to server-external and server-cluster with --link-key)",
            key.display()
        );
        return Ok(());
    }
    let (key, public) = crate::keys::generate(prefix)?;
    println!(
        "wrote {} (private, keep it secret) and {} (public, give it to the peer)",
        key.display(),
        public.display()
    );
    Ok(())
}
