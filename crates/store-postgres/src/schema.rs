//! The store's tables: embedded, versioned migrations and the runner that applies them
//! at connect. Each migration is a SQL file under `migrations/` whose `{schema}` stands
//! for the quoted schema name; `<schema>.herald_migrations` records those applied. The
//! runner takes a transaction-scoped advisory lock (two nodes starting at once apply
//! each migration once) and refuses a database migrated past what this binary knows.

use tokio_postgres::Client;

use crate::config::PgError;

/// Every migration, in order: (version, name, SQL). Adding one is one line here and
/// its file; a version is never reused or edited once released.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "topics", include_str!("../migrations/001_topics.sql")),
    (2, "queues", include_str!("../migrations/002_queues.sql")),
];

/// The highest version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0)
}

/// The schema name quoted for SQL (it was validated: no quote can be inside).
pub fn quoted(schema: &str) -> String {
    format!("\"{schema}\"")
}

/// Brings `schema` up to [`latest`] in one transaction: creates it and the migrations
/// table if missing, applies each missing migration in version order, and records it.
/// Fails, changing nothing, if the database holds a version newer than [`latest`].
/// Returns the versions applied now.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<Vec<i32>, PgError> {
    let q = quoted(schema);
    let db = |e: tokio_postgres::Error| PgError::Database(format!("migrating schema {schema}: {}", describe(&e)));
    let tx = client.transaction().await.map_err(db)?;
    // A migration may take longer than the statement timeout of normal work; the lock
    // wait too, while another node migrates.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await.map_err(db)?;
    // One lock per schema name, held to the end of the transaction.
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('herald-migrations:' || $1, 0))", &[&schema])
        .await
        .map_err(db)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.herald_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(db)?;
    let rows = tx.query(&format!("SELECT version FROM {q}.herald_migrations"), &[]).await.map_err(db)?;
    let mut applied = Vec::with_capacity(rows.len());
    for row in rows {
        applied.push(row.try_get::<_, i32>(0).map_err(db)?);
    }
    if let Some(&newest) = applied.iter().max() {
        if newest > latest() {
            return Err(PgError::NewerDatabase { schema: schema.to_owned(), database: newest, binary: latest() });
        }
    }
    let mut done = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        tx.batch_execute(&sql.replace("{schema}", &q)).await.map_err(|e| {
            PgError::Database(format!("migration {version} ({name}) in schema {schema}: {}", describe(&e)))
        })?;
        tx.execute(
            &format!("INSERT INTO {q}.herald_migrations (version, name, applied_at) VALUES ($1, $2, now())"),
            &[&version, &name],
        )
        .await
        .map_err(db)?;
        done.push(version);
    }
    tx.commit().await.map_err(db)?;
    if !done.is_empty() {
        tracing::info!(schema, versions = ?done, "PostgreSQL store migrated");
    }
    Ok(done)
}

/// A database error with PostgreSQL's own message, code and detail when it has them,
/// else the client's message with its causes (a TLS handshake says why it failed).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}; {detail})", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => {
            let mut out = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let said = c.to_string();
                if !out.contains(&said) {
                    out = format!("{out}: {said}");
                }
                cause = c.source();
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_unique() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(versions.first(), Some(&1));
    }

    #[test]
    fn every_table_is_in_the_schema() {
        for (version, _, sql) in MIGRATIONS {
            for line in sql.lines().map(str::trim) {
                let creates = ["CREATE TABLE", "CREATE SEQUENCE", "CREATE INDEX", "INSERT INTO"];
                if creates.iter().any(|c| line.starts_with(c)) {
                    assert!(line.contains("{schema}."), "migration {version}: {line}");
                }
            }
        }
    }
}
