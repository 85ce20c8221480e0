//! rigger.toml's limits against what the recipes configure on the servers: a limit that the
//! servers cannot honour would pass `validate` and fail at `up`.

/// Every replica streams through one of the primary's WAL senders, and rebuilding one takes
/// two (base backup and WAL stream) while the others keep streaming. Checked when compiling.
const _: () = assert!(
    rigger_config::DatabaseConfig::MAX_REPLICAS + 2 <= rigger_recipes::MAX_WAL_SENDERS,
    "rigger.toml allows more replicas than PostgreSQL's max_wal_senders serves"
);
