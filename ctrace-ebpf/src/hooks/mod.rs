//! One module per hook family.
pub mod conntrack;
pub mod kfree_skb;
