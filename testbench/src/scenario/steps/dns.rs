//! Names as the laptop resolves them (glibc, its own resolv.conf).

use anyhow::{bail, Context, Result};

use super::super::case::Case;
use super::super::schema::Resolve;
use super::super::values::Answer;

/// `resolve`: `getent` on the laptop gives the target's address first, or
/// (for `nothing`) no answer at all.
pub fn resolve(case: &mut Case, s: &Resolve) -> Result<()> {
    let (target, ipv6) = match &s.expect {
        Answer::Nothing => {
            return match case.laptop_check("getent", &["ahosts", &s.name]) {
                Ok(out) => bail!("{} resolved: {}", s.name, out.lines().next().unwrap_or("")),
                Err(_) => Ok(()),
            };
        }
        Answer::Address { target, ipv6 } => (target, *ipv6),
    };
    let want = case.address(target, ipv6)?;
    let family = if ipv6 { "ahostsv6" } else { "ahostsv4" };
    let out = case
        .laptop_check("getent", &[family, &s.name])
        .with_context(|| format!("{} does not resolve", s.name))?;
    let got: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    if got.first().copied() != Some(want.to_string().as_str()) {
        bail!("{} resolved to {got:?}, expected {want}", s.name);
    }
    Ok(())
}
