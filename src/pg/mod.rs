//! PostgreSQL plumbing the rest of the extension builds on: SPI with the snapshot choices the
//! protocol needs, the extension's catalog identity and the two identities code runs under, the
//! settings, the error type every module maps its failures to, small backend services, and SQL
//! argument types. Nothing here knows about projections.

pub mod backend;
pub mod catalog;
pub mod error;
pub mod settings;
pub mod spi;
pub mod types;
