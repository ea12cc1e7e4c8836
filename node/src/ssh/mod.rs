//! The node's embedded SSH server: one russh session per tunnelled client stream,
//! authenticated by the order's public keys only. Everything not explicitly
//! allowed here (password, keyboard-interactive, agent, X11, port forwarding,
//! other subsystems, other environment variables) is refused.

pub mod channel;
pub mod input;
pub mod pty;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::sandbox::process::env_allowed;
use channel::ChannelCtx;

/// Server settings shared by all connections.
pub fn config(host_key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-jusy_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // A failed key costs the client a second, as in sshd; the initial "none"
        // probe every OpenSSH client sends is answered at once.
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        // Idle shells are legitimate; the session's own limits end sessions.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        max_auth_attempts: 6,
        // The first window; later ones are the session's `Backlog::window`.
        window_size: input::WINDOW,
        preferred: russh::Preferred {
            kex: std::borrow::Cow::Borrowed(KEX),
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            mac: std::borrow::Cow::Borrowed(MACS),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    })
}

/// The ciphers offered to clients: those a current OpenSSH server offers,
/// AES-GCM first. A client takes the first of its own list that the server
/// offers, so this order only matters to clients without a preference;
/// OpenSSH lists ChaCha20-Poly1305 first, which costs this server (and the
/// client) about twice the CPU per byte of AES-GCM on a CPU with AES
/// instructions. Such clients are asked to prefer AES-GCM by what they are
/// told to run (the printed `ssh` command, `jusy ssh`), never by refusing
/// them: paramiko speaks only AES-CTR, Dropbear only AES-CTR and ChaCha20.
const CIPHERS: &[russh::cipher::Name] = {
    use russh::cipher::{
        AES_128_CTR, AES_128_GCM, AES_192_CTR, AES_256_CTR, AES_256_GCM, CHACHA20_POLY1305,
    };
    &[
        AES_128_GCM,
        AES_256_GCM,
        CHACHA20_POLY1305,
        AES_128_CTR,
        AES_192_CTR,
        AES_256_CTR,
    ]
};

/// MACs for the ciphers that need one (AES-CTR): encrypt-then-MAC only.
const MACS: &[russh::mac::Name] = &[russh::mac::HMAC_SHA256_ETM, russh::mac::HMAC_SHA512_ETM];

/// Key exchanges: the hybrid post-quantum one, Curve25519, and finite-field
/// groups of at least 4096 bits (the 2048-bit group 14 and group exchange,
/// whose moduli the client cannot check, are left out).
const KEX: &[russh::kex::Name] = {
    use russh::kex::{
        CURVE25519, CURVE25519_PRE_RFC_8731, DH_G16_SHA512, DH_G18_SHA512,
        EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT, EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        EXTENSION_SUPPORT_AS_CLIENT, EXTENSION_SUPPORT_AS_SERVER, MLKEM768X25519_SHA256,
    };
    &[
        MLKEM768X25519_SHA256,
        CURVE25519,
        CURVE25519_PRE_RFC_8731,
        DH_G16_SHA512,
        DH_G18_SHA512,
        EXTENSION_SUPPORT_AS_CLIENT,
        EXTENSION_SUPPORT_AS_SERVER,
        EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
        EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
    ]
};

/// Who may log in to one order, and as whom.
#[derive(Debug)]
pub struct Access {
    pub ctx: Arc<ChannelCtx>,
    pub keys: Vec<PublicKey>,
}

impl Access {
    fn allows(&self, user: &str, key: &PublicKey) -> bool {
        user == self.ctx.sandbox.user.name
            && self.keys.iter().any(|k| k.key_data() == key.key_data())
    }
}

/// Serves one client connection until it closes; `login` is told when the
/// client's user authenticates (once), which is what makes the connection count.
pub async fn serve<S>(
    config: Arc<russh::server::Config>,
    stream: S,
    access: Arc<Access>,
    login: oneshot::Sender<()>,
) -> Result<(), russh::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = ConnHandler {
        access,
        login: Some(login),
        open: Arc::default(),
        channels: JoinSet::new(),
    };
    let session = russh::server::run_stream(config, stream, handler).await?;
    session.await
}

/// Per-connection handler; dropping it (connection closed or session ended)
/// aborts its channel tasks.
struct ConnHandler {
    access: Arc<Access>,
    /// Told of the first accepted key.
    login: Option<oneshot::Sender<()>>,
    /// Channels open on this connection.
    open: Arc<AtomicUsize>,
    channels: JoinSet<()>,
}

/// Counts one open channel on its connection and its session until dropped.
struct Opened([Arc<AtomicUsize>; 2]);

impl Opened {
    /// Takes a place under both caps, or none.
    fn take(
        conn: &Arc<AtomicUsize>,
        conn_cap: usize,
        session: &Arc<AtomicUsize>,
        session_cap: usize,
    ) -> Option<Self> {
        let taken = |count: &AtomicUsize, cap: usize| {
            count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok()
        };
        if !taken(conn, conn_cap) {
            return None;
        }
        if !taken(session, session_cap) {
            conn.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self([conn.clone(), session.clone()]))
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        for count in &self.0 {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.access.allows(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Only a verified signature is a login; an offered key proves nothing.
        Ok(if self.access.allows(user, key.public_key) {
            if let Some(login) = self.login.take() {
                let _ = login.send(());
            }
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ctx = &self.access.ctx;
        let Some(opened) = Opened::take(
            &self.open,
            ctx.caps.per_connection,
            &ctx.open,
            ctx.caps.per_session,
        ) else {
            tracing::info!(caps = ?ctx.caps, "channel refused: too many open");
            reply
                .reject(ChannelOpenFailure::Other {
                    // SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
                    code: 1,
                    reason: "too many channels".into(),
                })
                .await;
            return Ok(());
        };
        reply.accept().await;
        let run = channel::run(channel, ctx.clone(), session.handle());
        self.channels.spawn(async move {
            run.await;
            drop(opened);
        });
        Ok(())
    }

    /// russh asks this each time it has refilled a channel's receive window,
    /// for the size of the next refill (on any channel of the connection).
    fn adjust_window(&mut self, _channel: ChannelId, _current: u32) -> u32 {
        self.access.ctx.backlog.window()
    }

    /// The data itself reaches the channel's task; this only paces a client
    /// that is held to a trickle of window (see `input`). A timer, never a
    /// wait on the client: the connection must keep being read.
    async fn data(
        &mut self,
        _channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(pause) = self.access.ctx.backlog.pause(data.len()) {
            tokio::time::sleep(pause).await;
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if env_allowed(name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_algorithms_are_known_and_strong() {
        for name in CIPHERS {
            assert!(russh::cipher::ALL_CIPHERS.contains(&name), "{name:?}");
        }
        for name in MACS {
            assert!(russh::mac::ALL_MAC_ALGORITHMS.contains(&name), "{name:?}");
            assert!(name.as_ref().ends_with("-etm@openssh.com"), "{name:?}");
        }
        for name in KEX {
            // Extension markers are names, not exchanges.
            let marker = ["ext-info-", "kex-strict-"]
                .iter()
                .any(|m| name.as_ref().starts_with(m));
            assert!(
                marker || russh::kex::ALL_KEX_ALGORITHMS.contains(&name),
                "{name:?}"
            );
            assert!(!name.as_ref().contains("sha1"), "{name:?}");
            assert!(!name.as_ref().contains("group14"), "{name:?}");
            assert!(!name.as_ref().contains("group-exchange"), "{name:?}");
        }
        // What a current OpenSSH server offers is all here.
        for openssh in [
            "chacha20-poly1305@openssh.com",
            "aes128-ctr",
            "aes192-ctr",
            "aes256-ctr",
            "aes128-gcm@openssh.com",
            "aes256-gcm@openssh.com",
        ] {
            assert!(CIPHERS.iter().any(|c| c.as_ref() == openssh), "{openssh}");
        }
        let key = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]);
        let config = config(PrivateKey::from(key));
        assert_eq!(&config.preferred.cipher[..], CIPHERS);
        assert_eq!(&config.preferred.mac[..], MACS);
        assert_eq!(&config.preferred.kex[..], KEX);
    }
}
