//! Loader side of the tracepoint tier (`tp_btf/kfree_skb`): the kernel layout
//! its program needs, taken from BTF.
use ctrace_common::KfreeSkbLayout;
use thiserror::Error;

use crate::btf::{Btf, BtfError};

pub const TRACEPOINT: &str = "kfree_skb";
pub const PROGRAM: &str = "kfree_skb";
pub const LAYOUT_GLOBAL: &str = "KFREE_SKB_LAYOUT";

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error(
        "the skb:kfree_skb tracepoint has no drop reason on this kernel (needs 5.17+, \
         or a 5.15 with the backport): its arguments are ({0})"
    )]
    NoDropReason(String),
    #[error(transparent)]
    Btf(#[from] BtfError),
}

/// The argument list the program is written for:
/// `(void *__data, struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`.
fn check_signature(btf: &Btf) -> Result<(), LayoutError> {
    let params = btf.typedef_fn_params("btf_trace_kfree_skb")?;
    let described: Vec<String> = params.iter().map(|p| btf.describe(*p)).collect();
    let expected = ["void *", "struct sk_buff *", "void *", "enum skb_drop_reason"];
    if described.len() < expected.len() || described[..expected.len()] != expected {
        return Err(LayoutError::NoDropReason(described.join(", ")));
    }
    Ok(())
}

/// Reads every offset and enum value the program uses.
pub fn layout(btf: &Btf) -> Result<KfreeSkbLayout, LayoutError> {
    check_signature(btf)?;
    let netfilter_drop = btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")?;
    Ok(KfreeSkbLayout {
        netfilter_drop_reason: netfilter_drop as u32,
        skb_head: btf.member_offset("sk_buff", "head")?,
        skb_network_header: btf.member_offset("sk_buff", "network_header")?,
        skb_protocol: btf.member_offset("sk_buff", "protocol")?,
        skb_nfct: btf.member_offset("sk_buff", "_nfct")?,
        skb_dev: btf.member_offset("sk_buff", "dev")?,
        skb_sk: btf.member_offset("sk_buff", "sk")?,
        dev_net: btf.member_offset("net_device", "nd_net.net")?,
        sock_net: btf.member_offset("sock", "__sk_common.skc_net.net")?,
        net_inum: btf.member_offset("net", "ns.inum")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::build::Builder;

    /// A miniature kernel: just the types the layout needs.
    fn kernel(with_reason: bool, with_nfct: bool) -> Vec<u8> {
        let mut b = Builder::new();
        let u16_ = b.int("u16", 2);
        let u32_ = b.int("unsigned int", 4);
        let ulong = b.int("unsigned long", 8);
        let uchar = b.int("unsigned char", 1);
        let head_ptr = b.ptr(uchar);
        let ns_common = b.composite(false, "ns_common", 8, &[("inum", u32_, 32, 0)]);
        let net = b.composite(false, "net", 64, &[("pad", ulong, 0, 0), ("ns", ns_common, 128, 0)]);
        let net_ptr = b.ptr(net);
        let possible_net = b.composite(false, "", 8, &[("net", net_ptr, 0, 0)]);
        let dev = b.composite(false, "net_device", 256, &[("nd_net", possible_net, 1024, 0)]);
        let common = b.composite(false, "sock_common", 64, &[("skc_net", possible_net, 384, 0)]);
        let sock = b.composite(false, "sock", 128, &[("__sk_common", common, 0, 0)]);
        let dev_ptr = b.ptr(dev);
        let sock_ptr = b.ptr(sock);
        let dev_union = b.composite(true, "", 8, &[("dev", dev_ptr, 0, 0), ("dev_scratch", ulong, 0, 0)]);
        let headers = b.composite(false, "", 8, &[("protocol", u16_, 0, 0), ("network_header", u16_, 32, 0)]);
        let mut members = vec![
            ("", dev_union, 128, 0),
            ("sk", sock_ptr, 192, 0),
            ("", headers, 1536, 0),
            ("head", head_ptr, 1600, 0),
        ];
        if with_nfct {
            members.push(("_nfct", ulong, 832, 0));
        }
        let skb = b.composite(false, "sk_buff", 232, &members);
        let skb_ptr = b.ptr(skb);
        let reasons = b.enumeration(
            "skb_drop_reason",
            &[("SKB_DROP_REASON_NOT_SPECIFIED", 2), ("SKB_DROP_REASON_NETFILTER_DROP", 12)],
        );
        let void_ptr = b.ptr(0);
        let params: Vec<u32> =
            if with_reason { vec![void_ptr, skb_ptr, void_ptr, reasons] } else { vec![void_ptr, skb_ptr, void_ptr] };
        let proto = b.func_proto(0, &params);
        let fp = b.ptr(proto);
        b.typedef("btf_trace_kfree_skb", fp);
        b.finish()
    }

    #[test]
    fn reads_the_layout_from_btf() {
        let btf = Btf::parse(&kernel(true, true), None).unwrap();
        let l = layout(&btf).unwrap();
        assert_eq!(l.netfilter_drop_reason, 12);
        assert_eq!((l.skb_dev, l.skb_sk, l.skb_nfct), (16, 24, 104));
        assert_eq!((l.skb_protocol, l.skb_network_header, l.skb_head), (192, 196, 200));
        assert_eq!((l.dev_net, l.sock_net, l.net_inum), (128, 48, 20));
    }

    #[test]
    fn kernels_without_the_reason_or_conntrack_are_refused() {
        let btf = Btf::parse(&kernel(false, true), None).unwrap();
        let err = layout(&btf).unwrap_err().to_string();
        assert!(err.contains("no drop reason"), "{err}");
        let btf = Btf::parse(&kernel(true, false), None).unwrap();
        let err = layout(&btf).unwrap_err().to_string();
        assert!(err.contains("_nfct"), "{err}");
    }

    /// The running kernel's BTF, where there is one: the layout must resolve.
    #[test]
    fn resolves_on_the_running_kernel() {
        let path = "/sys/kernel/btf/vmlinux";
        if !std::path::Path::new(path).exists() {
            eprintln!("SKIPPED: {path} is missing: this kernel has no BTF");
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let l = layout(&btf).unwrap();
        assert!(l.skb_head > 0 && l.skb_nfct > 0 && l.net_inum > 0, "{l:?}");
    }
}
