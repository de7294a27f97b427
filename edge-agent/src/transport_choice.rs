//! Which carrier a link's next connection attempt uses: QUIC over UDP, or the TCP fallback
//! (the same QUIC carried over TLS on TCP, `petrel_transport::stream_carrier`).
//!
//! With `transport = auto` a link uses UDP until [`UDP_FAILURES_BEFORE_TCP`] attempts in a row
//! found no answer over UDP (a network that blocks outbound UDP looks exactly like that; a hub
//! that refuses or a TLS failure is an answer and keeps UDP), then TCP. While on TCP the link
//! keeps trying UDP in the background (every `udp-retry-interval`, 30 s by default); once UDP
//! answers, the TCP tunnel is closed and the next attempt is UDP again. Pure: the link driver
//! reports what happened.

/// Attempts over UDP without any answer before the TCP fallback.
pub const UDP_FAILURES_BEFORE_TCP: u32 = 3;

/// The configured transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportMode {
    /// UDP, and TCP only while UDP gets no answer.
    #[default]
    Auto,
    Udp,
    Tcp,
}

impl TransportMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "udp" => Some(Self::Udp),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }
}

/// What carries one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Udp,
    Tcp,
}

impl Carrier {
    pub fn as_str(self) -> &'static str {
        match self {
            Carrier::Udp => "udp",
            Carrier::Tcp => "tcp",
        }
    }
}

/// One link's choice.
#[derive(Debug, Clone)]
pub struct TransportChoice {
    mode: TransportMode,
    udp_silent: u32,
}

impl TransportChoice {
    pub fn new(mode: TransportMode) -> Self {
        Self {
            mode,
            udp_silent: 0,
        }
    }

    /// The carrier of the next attempt.
    pub fn next(&self) -> Carrier {
        match self.mode {
            TransportMode::Udp => Carrier::Udp,
            TransportMode::Tcp => Carrier::Tcp,
            TransportMode::Auto if self.udp_silent >= UDP_FAILURES_BEFORE_TCP => Carrier::Tcp,
            TransportMode::Auto => Carrier::Udp,
        }
    }

    /// An attempt over `carrier` failed; `answered` if the hub answered at all (a refusal, a
    /// TLS alert), which proves the path works.
    pub fn failed(&mut self, carrier: Carrier, answered: bool) {
        if carrier == Carrier::Udp {
            self.udp_silent = if answered {
                0
            } else {
                self.udp_silent.saturating_add(1)
            };
        }
    }

    /// A connection over `carrier` is up.
    pub fn connected(&mut self, carrier: Carrier) {
        if carrier == Carrier::Udp {
            self.udp_silent = 0;
        }
    }

    /// UDP answered again while the link was on TCP: the next attempt is UDP.
    pub fn udp_answers(&mut self) {
        self.udp_silent = 0;
    }

    /// Whether a link connected over `carrier` should keep trying UDP in the background.
    pub fn retries_udp(&self, carrier: Carrier) -> bool {
        self.mode == TransportMode::Auto && carrier == Carrier::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_after_silent_udp_and_returns_when_udp_answers() {
        let mut c = TransportChoice::new(TransportMode::Auto);
        for _ in 0..UDP_FAILURES_BEFORE_TCP - 1 {
            assert_eq!(c.next(), Carrier::Udp);
            c.failed(Carrier::Udp, false);
        }
        // An answer (a refusal, a TLS alert) proves UDP works: no fallback.
        c.failed(Carrier::Udp, true);
        assert_eq!(c.next(), Carrier::Udp);
        for _ in 0..UDP_FAILURES_BEFORE_TCP {
            assert_eq!(c.next(), Carrier::Udp);
            c.failed(Carrier::Udp, false);
        }
        assert_eq!(c.next(), Carrier::Tcp);
        // TCP failing does not bring UDP back; TCP connected keeps the link on TCP.
        c.failed(Carrier::Tcp, false);
        assert_eq!(c.next(), Carrier::Tcp);
        c.connected(Carrier::Tcp);
        assert!(c.retries_udp(Carrier::Tcp));
        assert!(!c.retries_udp(Carrier::Udp));
        assert_eq!(c.next(), Carrier::Tcp);
        c.udp_answers();
        assert_eq!(c.next(), Carrier::Udp);
    }

    #[test]
    fn fixed_modes_never_switch() {
        let mut udp = TransportChoice::new(TransportMode::Udp);
        let mut tcp = TransportChoice::new(TransportMode::Tcp);
        for _ in 0..10 {
            udp.failed(Carrier::Udp, false);
            tcp.failed(Carrier::Tcp, false);
        }
        assert_eq!(udp.next(), Carrier::Udp);
        assert_eq!(tcp.next(), Carrier::Tcp);
        assert!(!tcp.retries_udp(Carrier::Tcp));
        assert_eq!(TransportMode::parse("auto"), Some(TransportMode::Auto));
        assert_eq!(TransportMode::parse("quic"), None);
    }
}
