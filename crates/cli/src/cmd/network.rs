//! `machinen network TARGET [--allow R]… [--deny R]… [--remove R]… [--egress D] [--clear] [--json]`

use machinen::network::{parse_rules, NetReport, PolicyChange};
use machinen::Result;

use crate::cli::NetworkArgs;
use crate::output::print_json;

pub async fn run(a: NetworkArgs) -> Result<i32> {
    let change = PolicyChange {
        clear: a.clear,
        egress: a.egress.as_deref().and_then(|e| e.parse().ok()),
        allow: parse_rules("--allow", &a.allow)?,
        deny: parse_rules("--deny", &a.deny)?,
        remove: parse_rules("--remove", &a.remove)?,
    };
    let vm = machinen::attach(&a.target).await?;
    let report = if change.is_empty() {
        vm.network().await?
    } else {
        vm.set_network(change).await?
    };
    if a.json {
        print_json(&report);
    } else {
        print(vm.name(), &report);
    }
    Ok(0)
}

pub(crate) fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print(name: &str, r: &NetReport) {
    let p = &r.policy;
    crate::outln!("{name}: egress {} by default", p.egress);
    for rule in &p.allow {
        crate::outln!("  allow {rule}");
    }
    for rule in &p.deny {
        crate::outln!("  deny  {rule}");
    }
    let c = &r.counters;
    let n = |count: u64, one: &str, many: &str| {
        format!("{count} {}", if count == 1 { one } else { many })
    };
    crate::outln!(
        "traffic: {} out, {} in; {}; DNS {} answered, {} refused; {} refused",
        size(c.bytes_out),
        size(c.bytes_in),
        n(c.connections, "connection", "connections"),
        c.dns_answered,
        c.dns_refused,
        n(c.refused, "attempt", "attempts")
    );
    for k in &c.refused_by {
        crate::outln!(
            "  refused {:>6}× {} {} ({})",
            k.count,
            k.proto,
            k.destination,
            k.rule
        );
    }
}
