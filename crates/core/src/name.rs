//! Topic names: the validated newtype every other layer passes around.
//!
//! A name is 1 to 255 characters: segments of `[A-Za-z0-9_:-]` joined by single dots.
//! Parsing is the only way to build one, so a `TopicName` in hand is always valid.

use std::fmt;
use std::sync::Arc;

/// Longest accepted name, in bytes (all accepted characters are ASCII).
pub const MAX_NAME_LEN: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or longer than [`MAX_NAME_LEN`].
    #[error("name must be 1 to {MAX_NAME_LEN} characters, got {0}")]
    Length(usize),
    /// A character outside `[A-Za-z0-9_:-.]`.
    #[error("name contains {0:?}; allowed are A-Z a-z 0-9 _ : - and single dots between segments")]
    Character(char),
    /// A queue name (not a dead-letter queue) longer than 251 characters.
    #[error("queue name must be at most 251 characters so that its .dlq fits, got {0}")]
    QueueLength(usize),
    /// A leading, trailing or double dot.
    #[error("name has an empty segment (leading, trailing or double dot)")]
    EmptySegment,
}

/// A validated topic name; cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// Validates `s` against the naming rules.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        validate(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the naming rules shared by topics and queues.
pub fn validate(s: &str) -> Result<(), NameError> {
    let len = s.chars().count();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(NameError::Length(len));
    }
    let mut prev_dot = true; // a leading dot is an empty segment
    for c in s.chars() {
        match c {
            '.' if prev_dot => return Err(NameError::EmptySegment),
            '.' => prev_dot = true,
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | ':' | '-' => prev_dot = false,
            other => return Err(NameError::Character(other)),
        }
    }
    if prev_dot {
        return Err(NameError::EmptySegment);
    }
    Ok(())
}

/// The suffix of a dead-letter queue's name.
pub const DLQ_SUFFIX: &str = ".dlq";

/// A validated queue name. A name ending in `.dlq` is a dead-letter queue that Herald
/// owns; other names are at most 251 characters so their `.dlq` fits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

impl QueueName {
    /// Validates `s` against the naming rules.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        validate(s)?;
        if !s.ends_with(DLQ_SUFFIX) && s.len() > MAX_NAME_LEN - DLQ_SUFFIX.len() {
            return Err(NameError::QueueLength(s.len()));
        }
        Ok(Self(Arc::from(s)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a dead-letter queue.
    pub fn is_dlq(&self) -> bool {
        self.0.ends_with(DLQ_SUFFIX)
    }

    /// The dead-letter queue of this queue (`None` for a dead-letter queue).
    pub fn dlq(&self) -> Option<QueueName> {
        (!self.is_dlq()).then(|| QueueName(Arc::from(format!("{}{DLQ_SUFFIX}", self.0))))
    }

    /// The queue whose dead-letter queue this is (`None` for a queue that is not a
    /// dead-letter queue, and for `x.dlq.dlq`: `x.dlq` has no dead-letter queue).
    pub fn parent(&self) -> Option<QueueName> {
        let parent = self.0.strip_suffix(DLQ_SUFFIX)?;
        // What precedes `.dlq` in a valid name is itself valid (a non-empty segment) and
        // at most 251 characters, so it parses; a parent that is a dead-letter queue has none.
        QueueName::parse(parent).ok().filter(|p| !p.is_dlq())
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for ok in ["news", "orders.eu.created", "a:b-c_d", "X", &"a".repeat(255)] {
            assert!(TopicName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_invalid_names() {
        assert_eq!(TopicName::parse(""), Err(NameError::Length(0)));
        assert_eq!(TopicName::parse(&"a".repeat(256)), Err(NameError::Length(256)));
        for bad in [".a", "a.", "a..b", "."] {
            assert_eq!(TopicName::parse(bad), Err(NameError::EmptySegment), "{bad}");
        }
        assert_eq!(TopicName::parse("a b"), Err(NameError::Character(' ')));
        assert_eq!(TopicName::parse("a/b"), Err(NameError::Character('/')));
        assert_eq!(TopicName::parse("é"), Err(NameError::Character('é')));
    }

    #[test]
    fn queue_names_leave_room_for_the_dlq() {
        let q = QueueName::parse("jobs").expect("valid");
        assert_eq!(q.dlq().map(|d| d.as_str().to_owned()), Some("jobs.dlq".into()));
        assert!(q.dlq().is_some_and(|d| d.is_dlq() && d.dlq().is_none()));
        assert!(QueueName::parse(&"a".repeat(251)).is_ok());
        assert_eq!(QueueName::parse(&"a".repeat(252)), Err(NameError::QueueLength(252)));
        assert!(QueueName::parse(&format!("{}.dlq", "a".repeat(251))).is_ok());
    }

    #[test]
    fn a_dead_letter_queue_names_its_parent() -> Result<(), NameError> {
        let jobs = QueueName::parse("jobs")?;
        assert_eq!(jobs.dlq().and_then(|d| d.parent()), Some(jobs.clone()));
        assert_eq!(jobs.parent(), None);
        assert_eq!(QueueName::parse("jobs.dlq.dlq")?.parent(), None, "jobs.dlq has no dead-letter queue");
        let longest = "a".repeat(251);
        assert_eq!(QueueName::parse(&format!("{longest}.dlq"))?.parent(), Some(QueueName::parse(&longest)?));
        Ok(())
    }
}
