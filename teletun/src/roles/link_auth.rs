//! The AF_UNIX link's authentication, both ends: before the link carries a
//! greeting, server-cluster and server-external each prove they hold the
//! pair's link key (`proto::link::AuthMessage`). A server of another pair on
//! the same node — the socket's directory and uid are no secret to it — then
//! never links up with this one. Either end refuses a peer that skips the
//! exchange its own key asks for, so a key given to one server only is said
//! at once, not as a silent downgrade.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::io::seqpacket::SeqPacket;
use crate::keys::LinkKey;
use crate::proto::link::{link_mac, AuthMessage, Prover, NONCE_LEN};

/// How long either end waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    openssl::rand::rand_bytes(&mut n).expect("the system's random numbers");
    n
}

fn recv(link: &SeqPacket, what: &str) -> Result<Vec<u8>> {
    let mut buf = [0u8; 128];
    match link.recv_message(&mut buf, STEP_TIMEOUT) {
        Ok(0) => Err(anyhow!("the peer closed the link before its {what}")),
        Ok(n) => Ok(buf[..n].to_vec()),
        Err(e) => Err(anyhow!("no {what} from the peer: {e}")),
    }
}

/// server-cluster's side: challenges, checks server-external's answer, and
/// confirms with its own proof.
pub fn prove_cluster(link: &SeqPacket, key: &LinkKey) -> Result<()> {
    let cluster = nonce();
    link.send_message(&AuthMessage::Challenge { cluster }.encode(), STEP_TIMEOUT)?;
    let answer = recv(link, "answer to the link key challenge (does it have --link-key?)")?;
    let Some(AuthMessage::Answer { external, mac }) = AuthMessage::decode(&answer) else {
        bail!(
            "the peer did not answer the link key challenge (a server-external without --link-key, or another program)"
        );
    };
    let expected = link_mac(key.bytes(), Prover::External, &cluster, &external);
    if !openssl::memcmp::eq(&mac, &expected) {
        bail!("the peer's proof does not match this pair's link key (another pair's server-external?)");
    }
    let mac = link_mac(key.bytes(), Prover::Cluster, &cluster, &external);
    link.send_message(&AuthMessage::Confirm { mac }.encode(), STEP_TIMEOUT)?;
    Ok(())
}

/// server-external's side, given server-cluster's first message: answers
/// its challenge and checks its confirmation. Returns once the peer is
/// proven (with `key`) or, without a key, if the peer asked for no proof.
pub fn prove_external(link: &SeqPacket, first: &[u8], key: Option<&LinkKey>) -> Result<()> {
    let asked = AuthMessage::is_auth(first);
    let key = match (key, asked) {
        (None, false) => return Ok(()),
        (None, true) => bail!(
            "server-cluster authenticates the link, but this server-external has no --link-key: give it the pair's link key"
        ),
        (Some(_), false) => bail!(
            "server-cluster sent its greeting without proving it holds the link key (started without --link-key, or another pair's?): refused"
        ),
        (Some(key), true) => key,
    };
    let Some(AuthMessage::Challenge { cluster }) = AuthMessage::decode(first) else {
        bail!("server-cluster sent a malformed link key challenge");
    };
    let external = nonce();
    let mac = link_mac(key.bytes(), Prover::External, &cluster, &external);
    link.send_message(&AuthMessage::Answer { external, mac }.encode(), STEP_TIMEOUT)?;
    let confirm = recv(link, "confirmation").map_err(|e| {
        anyhow!("server-cluster refused this server-external's link key (another pair's server-cluster?): {e}")
    })?;
    let Some(AuthMessage::Confirm { mac }) = AuthMessage::decode(&confirm) else {
        bail!("server-cluster sent a malformed link key confirmation");
    };
    let expected = link_mac(key.bytes(), Prover::Cluster, &cluster, &external);
    if !openssl::memcmp::eq(&mac, &expected) {
        bail!("server-cluster's proof does not match this pair's link key (another pair's server-cluster?)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};

    fn pair() -> (SeqPacket, SeqPacket) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap())
    }

    /// Runs both sides at once; server-cluster's first message is its
    /// challenge when it has a key, else a greeting.
    fn exchange(cluster_key: Option<[u8; 32]>, external_key: Option<[u8; 32]>) -> (Result<()>, Result<()>) {
        let (c, e) = pair();
        let cluster = std::thread::spawn(move || match cluster_key {
            Some(k) => prove_cluster(&c, &LinkKey::from_bytes(k)),
            None => c
                .send_message(b"10.244.1.5\0\0", STEP_TIMEOUT)
                .map_err(Into::into)
                .map(|()| drop(c)),
        });
        let first = recv(&e, "first message").unwrap();
        let external = prove_external(&e, &first, external_key.map(LinkKey::from_bytes).as_ref());
        drop(e);
        (cluster.join().unwrap(), external)
    }

    #[test]
    fn the_same_key_proves_both_ends() {
        let (c, e) = exchange(Some([1; 32]), Some([1; 32]));
        c.unwrap();
        e.unwrap();
        let (c, e) = exchange(None, None);
        c.unwrap();
        e.unwrap();
    }

    #[test]
    fn another_pairs_key_is_refused_on_both_ends() {
        let (c, e) = exchange(Some([1; 32]), Some([2; 32]));
        let c = c.unwrap_err().to_string();
        assert!(c.contains("does not match this pair's link key"), "{c}");
        let e = e.unwrap_err().to_string();
        assert!(e.contains("refused this server-external's link key"), "{e}");
    }

    #[test]
    fn a_key_on_one_end_only_is_said_on_that_end() {
        let (c, e) = exchange(Some([1; 32]), None);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("has no --link-key"), "{e}");
        let c = c.unwrap_err().to_string();
        assert!(c.contains("closed the link before its answer"), "{c}");
        let (_, e) = exchange(None, Some([1; 32]));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("without proving it holds the link key"), "{e}");
    }

    #[test]
    fn a_replayed_answer_proves_nothing() {
        // An intruder that saw one exchange resends its answer: the new
        // challenge's nonce makes it worthless.
        let key = [9u8; 32];
        let old = AuthMessage::Answer {
            external: [5; NONCE_LEN],
            mac: link_mac(&key, Prover::External, &[6; NONCE_LEN], &[5; NONCE_LEN]),
        };
        let (c, intruder) = pair();
        let cluster = std::thread::spawn(move || prove_cluster(&c, &LinkKey::from_bytes(key)));
        recv(&intruder, "challenge").unwrap();
        intruder.send_message(&old.encode(), STEP_TIMEOUT).unwrap();
        let c = cluster.join().unwrap().unwrap_err().to_string();
        assert!(c.contains("does not match"), "{c}");
    }
}
