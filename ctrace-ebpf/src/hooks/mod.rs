//! One module per hook family.
pub mod conntrack;
pub mod invalid;
pub mod kfree_skb;
