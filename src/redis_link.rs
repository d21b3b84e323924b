//! The one way vigil talks to Redis: a single server through the `redis` crate's
//! `ConnectionManager`, or a Redis Cluster through its cluster connection, behind one type.
//!
//! Every key vigil writes starts with the hash tag `{<key_prefix>}` ([`key`]), so in a Redis
//! Cluster all of them live in one hash slot: the pipelines that write the shared stream, the
//! retained hash and the history streams together never cross slots. A cluster therefore gives
//! vigil failover (with replicas), not sharding; one stream carries all traffic anyway
//! (docs/cluster.md).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::RedisConfig;

/// A connection to Redis or a Redis Cluster; clones share it (both kinds multiplex).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Connects as `[redis]` says, once: callers own the retry policy. `timeout` bounds the
/// connection attempt and every later round trip.
pub async fn connect(config: &RedisConfig, timeout: Duration) -> RedisResult<RedisConn> {
    if config.cluster {
        let client = ClusterClientBuilder::new(nodes(&config.url))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()?;
        Ok(RedisConn::Cluster(client.get_async_connection().await?))
    } else {
        let client = redis::Client::open(config.url.as_str())?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(0);
        Ok(RedisConn::Single(
            ConnectionManager::new_with_config(client, manager).await?,
        ))
    }
}

/// Whether `url` is usable for `[redis]`: one `redis://` URL, or with `cluster` a
/// comma-separated list of them (the seed nodes).
pub fn check_url(url: &str, cluster: bool) -> bool {
    if cluster {
        let seeds = nodes(url);
        !seeds.is_empty()
            && seeds
                .iter()
                .all(|u| redis::Client::open(u.as_str()).is_ok())
            && ClusterClientBuilder::new(seeds).build().is_ok()
    } else {
        !url.contains(',') && redis::Client::open(url).is_ok()
    }
}

fn nodes(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// The name of one of vigil's keys: `{prefix}:suffix` (one hash slot for all of them).
pub fn key(prefix: &str, suffix: &str) -> String {
    format!("{{{prefix}}}:{suffix}")
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        assert_eq!(key("vigil", "bus"), "{vigil}:bus");
        assert_eq!(key("plant-a", "hist:m-1"), "{plant-a}:hist:m-1");
    }

    #[test]
    fn urls_are_checked_for_their_mode() {
        assert!(check_url("redis://127.0.0.1:6379/0", false));
        assert!(!check_url("redis://a:1,redis://b:2", false));
        assert!(check_url("redis://a:7000, redis://b:7001", true));
        assert!(!check_url("", true));
        assert!(!check_url("http://x", false));
    }
}
