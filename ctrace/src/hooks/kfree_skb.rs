//! Loader side of the tracepoint tier (`tp_btf/kfree_skb`): the kernel layout
//! its program needs, taken from BTF.
use ctrace_common::KfreeSkbLayout;
use thiserror::Error;

use crate::btf::{Btf, BtfError};

pub const TRACEPOINT: &str = "kfree_skb";
pub const LAYOUT_GLOBAL: &str = "KFREE_SKB_LAYOUT";
/// The function netfilter frees NF_DROP packets in.
pub const DROP_SITE: &str = "nf_hook_slow";

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("the skb:kfree_skb tracepoint has arguments ctrace does not know on this kernel: ({0})")]
    UnknownSignature(String),
    #[error(
        "this kernel's skb:kfree_skb has no drop reason, so ctrace finds netfilter's drops by where they are \
         freed, and {DROP_SITE} is not in /proc/kallsyms (kptr_restrict hides addresses from this user?)"
    )]
    NoDropSite,
    #[error(transparent)]
    Btf(#[from] BtfError),
}

/// How the program tells netfilter's drops from every other freed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropTest {
    /// `reason == SKB_DROP_REASON_NETFILTER_DROP` (5.17+, and backports).
    Reason,
    /// The free location is inside `nf_hook_slow` (kernels before the reason).
    Location,
}

impl DropTest {
    /// The kernel program that implements it.
    pub fn program(self) -> &'static str {
        match self {
            DropTest::Reason => "kfree_skb",
            DropTest::Location => "kfree_skb_location",
        }
    }

    /// What `probes` and the record say about it.
    pub fn describe(self) -> &'static str {
        match self {
            DropTest::Reason => "tp_btf/skb:kfree_skb",
            DropTest::Location => {
                "tp_btf/skb:kfree_skb without a drop reason on this kernel: packets freed in nf_hook_slow (NF_DROP)"
            }
        }
    }
}

/// The argument lists the programs are written for:
/// `(void *__data, struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`,
/// or before the reason `(void *__data, struct sk_buff *skb, void *location)`.
fn drop_test(btf: &Btf) -> Result<DropTest, LayoutError> {
    let params = btf.typedef_fn_params("btf_trace_kfree_skb")?;
    let described: Vec<String> = params.iter().map(|p| btf.describe(*p)).collect();
    let location = ["void *", "struct sk_buff *", "void *"];
    if described == location {
        Ok(DropTest::Location)
    } else if described.len() >= 4 && described[..3] == location && described[3] == "enum skb_drop_reason" {
        Ok(DropTest::Reason)
    } else {
        Err(LayoutError::UnknownSignature(described.join(", ")))
    }
}

/// Reads every offset and enum value the program uses, and which program.
/// `drop_site`: the code range of [`DROP_SITE`], needed where the
/// tracepoint has no reason.
pub fn layout(btf: &Btf, drop_site: Option<std::ops::Range<u64>>) -> Result<(KfreeSkbLayout, DropTest), LayoutError> {
    let test = drop_test(btf)?;
    let (netfilter_drop_reason, site) = match test {
        DropTest::Reason => (btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")? as u32, 0..0),
        DropTest::Location => (u32::MAX, drop_site.ok_or(LayoutError::NoDropSite)?),
    };
    let layout = KfreeSkbLayout {
        netfilter_drop_reason,
        skb_head: btf.member_offset("sk_buff", "head")?,
        skb_network_header: btf.member_offset("sk_buff", "network_header")?,
        skb_protocol: btf.member_offset("sk_buff", "protocol")?,
        skb_nfct: btf.member_offset("sk_buff", "_nfct")?,
        skb_dev: btf.member_offset("sk_buff", "dev")?,
        skb_sk: btf.member_offset("sk_buff", "sk")?,
        dev_net: btf.member_offset("net_device", "nd_net.net")?,
        sock_net: btf.member_offset("sock", "__sk_common.skc_net.net")?,
        net_inum: btf.member_offset("net", "ns.inum")?,
        // Conntrack's types may be in its module: see `with_conntrack`.
        ct_status: 0,
        ips_confirmed: 0,
        drop_site_start: site.start,
        drop_site_end: site.end,
    };
    Ok((layout, test))
}

/// Lets the drop program tell an unconfirmed entry (not yet in the table)
/// from a confirmed one, with conntrack's own layout.
pub fn with_conntrack(mut layout: KfreeSkbLayout, ct: &ctrace_common::ConntrackLayout) -> KfreeSkbLayout {
    layout.ct_status = ct.ct_status;
    layout.ips_confirmed = ct.ips_confirmed;
    layout
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
        let (l, test) = layout(&btf, None).unwrap();
        assert_eq!(test, DropTest::Reason);
        assert_eq!((l.drop_site_start, l.drop_site_end), (0, 0));
        assert_eq!(l.netfilter_drop_reason, 12);
        assert_eq!((l.skb_dev, l.skb_sk, l.skb_nfct), (16, 24, 104));
        assert_eq!((l.skb_protocol, l.skb_network_header, l.skb_head), (192, 196, 200));
        assert_eq!((l.dev_net, l.sock_net, l.net_inum), (128, 48, 20));
    }

    #[test]
    fn kernels_without_the_reason_find_drops_by_location() {
        let btf = Btf::parse(&kernel(false, true), None).unwrap();
        let (l, test) = layout(&btf, Some(0xffffffff81f2af50..0xffffffff81f2b100)).unwrap();
        assert_eq!(test, DropTest::Location);
        assert_eq!(test.program(), "kfree_skb_location");
        assert_eq!((l.drop_site_start, l.drop_site_end), (0xffffffff81f2af50, 0xffffffff81f2b100));
        // Without the site's address (kptr_restrict) it says why, in one sentence.
        let err = layout(&btf, None).unwrap_err().to_string();
        assert!(err.contains("no drop reason") && err.contains("nf_hook_slow"), "{err}");
    }

    #[test]
    fn kernels_without_conntrack_are_refused() {
        let btf = Btf::parse(&kernel(true, false), None).unwrap();
        let err = layout(&btf, None).unwrap_err().to_string();
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
        let (l, _) = layout(&btf, Some(1..2)).unwrap();
        assert!(l.skb_head > 0 && l.skb_nfct > 0 && l.net_inum > 0, "{l:?}");
    }
}
