//! The one grant model of every door: actions over name patterns, deny wins.
//!
//! A pattern is dot-separated like the names it matches: `*` matches exactly one
//! segment, `>` (only as the last segment) one or more, and `{user}` anywhere in a
//! segment stands for the caller's name. `chat.>` matches `chat.a` and `chat.a.b`, not
//! `chat`; `users.{user}.*` matches `users.alice.inbox` for alice only.

use std::fmt;

use serde::Deserialize;

/// What a caller does to a topic or queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Publish to a topic.
    Publish,
    /// Subscribe to a topic (any door), read its history or its info.
    Subscribe,
    /// Enqueue into a queue.
    Enqueue,
    /// Fetch, ack, requeue and extend a queue's jobs.
    Consume,
    /// Delete topics, list topics, read queue counts.
    Admin,
}

impl Action {
    /// Every action, in the order of [`Action::as_str`].
    pub const ALL: [Action; 5] = [Action::Publish, Action::Subscribe, Action::Enqueue, Action::Consume, Action::Admin];

    /// The action's name, as in the configuration and token claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Enqueue => "enqueue",
            Action::Consume => "consume",
            Action::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pattern that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grant pattern {pattern:?}: {why}")]
pub struct PatternError {
    /// The pattern.
    pub pattern: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// One name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<String>,
}

impl Pattern {
    /// Parses `pattern` (see the module docs).
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let err = |why| PatternError { pattern: pattern.to_owned(), why };
        if pattern.is_empty() || pattern.len() > 512 {
            return Err(err("must be 1 to 512 characters"));
        }
        let segments: Vec<String> = pattern.split('.').map(str::to_owned).collect();
        for (i, s) in segments.iter().enumerate() {
            if s.is_empty() {
                return Err(err("has an empty segment"));
            }
            if s.contains('>') && (s != ">" || i + 1 != segments.len()) {
                return Err(err("`>` must be a whole segment, and the last"));
            }
            if s.contains('*') && s != "*" {
                return Err(err("`*` must be a whole segment"));
            }
            if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err("has whitespace or a control character"));
            }
            let unbraced = s.replace("{user}", "");
            if unbraced.contains(['{', '}']) {
                return Err(err("braces are only allowed as `{user}`"));
            }
        }
        Ok(Self { segments })
    }

    /// Whether `name` matches, for the caller `user`.
    pub fn matches(&self, user: &str, name: &str) -> bool {
        let mut names = name.split('.');
        for seg in &self.segments {
            if seg == ">" {
                // One or more segments left.
                return names.next().is_some();
            }
            let Some(part) = names.next() else { return false };
            if seg == "*" {
                continue;
            }
            let matched = if seg.contains("{user}") {
                // A user name with a dot never matches a single segment.
                !user.contains('.') && *seg.replace("{user}", user) == *part
            } else {
                seg == part
            };
            if !matched {
                return false;
            }
        }
        names.next().is_none()
    }
}

/// Patterns per action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatternSet {
    by_action: [Vec<Pattern>; 5],
}

impl PatternSet {
    fn matches(&self, action: Action, user: &str, name: &str) -> bool {
        self.by_action[action.index()].iter().any(|p| p.matches(user, name))
    }

    fn is_empty(&self) -> bool {
        self.by_action.iter().all(Vec::is_empty)
    }
}

/// What a caller may do: allowed patterns per action, and denied ones (deny wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    allow: PatternSet,
    deny: PatternSet,
}

/// Grants as written in the configuration or a token's claim: a list of patterns per
/// action, and a `deny` table of the same shape.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrantsSpec {
    /// Topics the caller may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topics the caller may subscribe to, read and inspect.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Queues the caller may enqueue into.
    #[serde(default)]
    pub enqueue: Vec<String>,
    /// Queues whose jobs the caller may fetch, ack, requeue and extend.
    #[serde(default)]
    pub consume: Vec<String>,
    /// Topics the caller may delete and list, queues whose counts it may read.
    #[serde(default)]
    pub admin: Vec<String>,
    /// Patterns refused even where the lists above allow them.
    #[serde(default)]
    pub deny: Option<Box<GrantsSpec>>,
}

impl GrantsSpec {
    fn lists(&self) -> [&Vec<String>; 5] {
        [&self.publish, &self.subscribe, &self.enqueue, &self.consume, &self.admin]
    }

    fn set(&self) -> Result<PatternSet, PatternError> {
        let mut set = PatternSet::default();
        for (i, list) in self.lists().into_iter().enumerate() {
            set.by_action[i] = list.iter().map(|p| Pattern::parse(p)).collect::<Result<_, _>>()?;
        }
        Ok(set)
    }

    /// Checks every pattern and builds the grants.
    pub fn build(&self) -> Result<Grants, PatternError> {
        let deny = match &self.deny {
            Some(d) if d.deny.is_some() => {
                return Err(PatternError { pattern: "deny.deny".into(), why: "a deny table has no deny of its own" })
            }
            Some(d) => d.set()?,
            None => PatternSet::default(),
        };
        Ok(Grants { allow: self.set()?, deny })
    }
}

impl Grants {
    /// Whether `user` may do `action` on `name`: some allowed pattern matches and no
    /// denied one does.
    pub fn allows(&self, user: &str, action: Action, name: &str) -> bool {
        self.allow.matches(action, user, name) && !self.deny.matches(action, user, name)
    }

    /// Whether nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn patterns_match_segments() {
        assert!(p("chat.>").matches("a", "chat.x"));
        assert!(p("chat.>").matches("a", "chat.x.y"));
        assert!(!p("chat.>").matches("a", "chat"));
        assert!(!p("chat.>").matches("a", "chatter.x"));
        assert!(p("chat.*").matches("a", "chat.x"));
        assert!(!p("chat.*").matches("a", "chat.x.y"));
        assert!(p("*").matches("a", "x"));
        assert!(!p("*").matches("a", "x.y"));
        assert!(p(">").matches("a", "x.y"));
        assert!(p("a.b").matches("u", "a.b"));
        assert!(!p("a.b").matches("u", "a.b.c"));
        assert!(!p("a.b.c").matches("u", "a.b"));
        assert!(p("users.{user}.>").matches("alice", "users.alice.inbox"));
        assert!(!p("users.{user}.>").matches("bob", "users.alice.inbox"));
        assert!(p("inbox-{user}").matches("bob", "inbox-bob"));
        assert!(!p("users.{user}").matches("a.b", "users.a.b"), "a dotted user name spans no segments");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a..b", "a.>.b", "a>", "a*", "a.{x}", "a b", ".a", "a."] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deny_wins() -> Result<(), PatternError> {
        let spec = GrantsSpec {
            publish: vec!["chat.>".into()],
            subscribe: vec![">".into()],
            deny: Some(Box::new(GrantsSpec { publish: vec!["chat.announce".into()], ..Default::default() })),
            ..Default::default()
        };
        let g = spec.build()?;
        assert!(g.allows("u", Action::Publish, "chat.room"));
        assert!(!g.allows("u", Action::Publish, "chat.announce"));
        assert!(g.allows("u", Action::Subscribe, "chat.announce"));
        assert!(!g.allows("u", Action::Enqueue, "chat.room"), "nothing granted, nothing allowed");
        Ok(())
    }
}
