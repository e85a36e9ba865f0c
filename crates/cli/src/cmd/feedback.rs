//! `machinen feedback TEXT` / `machinen feedback --list`

use machinen::Result;

use crate::cli::FeedbackArgs;
use crate::output::print_json;

pub fn run(a: FeedbackArgs) -> Result<i32> {
    if a.list {
        let notes = machinen::feedback::list()?;
        if a.json {
            print_json(&notes);
        } else if notes.is_empty() {
            crate::outln!("no feedback recorded yet; `machinen feedback \"TEXT\"` adds a note");
        } else {
            for n in &notes {
                crate::outln!("{} ({}) {}", n.time, n.version, n.text);
            }
        }
        return Ok(0);
    }
    let note = machinen::feedback::record(a.text.as_deref().unwrap_or_default())?;
    if a.json {
        print_json(&note);
    } else {
        crate::outln!(
            "thanks: noted in {} (kept locally, not sent anywhere)",
            machinen::feedback::path()?.display()
        );
    }
    Ok(0)
}
