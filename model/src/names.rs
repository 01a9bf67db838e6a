//! Kubernetes object names as they appear in kvstore keys: namespaces and service names are
//! DNS-1123 labels, node and pod names DNS-1123 subdomains, port names IANA service names.

/// Why an object name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a DNS-1123 label (namespaces, services).
    #[error(
        "{what} {name:?} must be 1 to 63 lower case letters, digits or '-', starting and ending with a letter or digit"
    )]
    Label {
        /// What the name is of.
        what: &'static str,
        /// The refused name.
        name: String,
    },
    /// Not a DNS-1123 subdomain (nodes, pods).
    #[error(
        "{what} {name:?} must be 1 to 253 lower case letters, digits, '-' or '.', starting and ending with a letter or digit"
    )]
    Subdomain {
        /// What the name is of.
        what: &'static str,
        /// The refused name.
        name: String,
    },
    /// Not an IANA service name (port names).
    #[error("port name {0:?} must be 1 to 15 lower case letters, digits or '-', with a letter")]
    PortName(String),
}

fn is_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= max
        && b.iter().all(|&c| alnum(c) || c == b'-')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
}

/// Checks a DNS-1123 label, naming `what` in the error.
pub fn check_dns_label(what: &'static str, name: &str) -> Result<(), NameError> {
    if is_label(name, 63) {
        Ok(())
    } else {
        Err(NameError::Label {
            what,
            name: name.to_owned(),
        })
    }
}

/// Checks a DNS-1123 subdomain, naming `what` in the error.
pub fn check_dns_subdomain(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.len() <= 253 && name.split('.').all(|part| is_label(part, 63)) {
        Ok(())
    } else {
        Err(NameError::Subdomain {
            what,
            name: name.to_owned(),
        })
    }
}

/// Checks an IANA service name (a Kubernetes port name).
pub fn check_port_name(name: &str) -> Result<(), NameError> {
    if is_label(name, 15) && !name.contains("--") && name.bytes().any(|c| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(NameError::PortName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert_eq!(check_dns_label("namespace", "kube-system"), Ok(()));
        for bad in ["", "-a", "a-", "A", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label("namespace", bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_dns_subdomain("node", "node-1.zone-a.example"), Ok(()));
        for bad in ["", ".a", "a.", "a..b", "a/b", "A"] {
            assert!(check_dns_subdomain("node", bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_port_name("http-alt"), Ok(()));
        for bad in ["", "8080", "a--b", "HTTP", "abcdefghijklmnop"] {
            assert_eq!(
                check_port_name(bad),
                Err(NameError::PortName(bad.into())),
                "{bad:?}"
            );
        }
    }
}
