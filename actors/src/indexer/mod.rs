pub mod embed;
pub mod search;
