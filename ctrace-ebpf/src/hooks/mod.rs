//! One module per hook family.
pub mod kfree_skb;
