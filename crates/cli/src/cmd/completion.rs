//! `machinen completion bash|zsh|fish`: the static completions clap
//! generates from the grammar, plus a hook that completes live VM names
//! (from the hidden `machinen __vm-names`) where a TARGET goes.

use clap::CommandFactory;
use clap_complete::{generate, Shell as CShell};

use crate::args::Shell;
use crate::cli::Cli;

/// Subcommands whose first positional argument is a VM.
pub const TARGET_COMMANDS: &[&str] = &["exec", "attach", "repl", "stop", "mux", "cp"];

const BASH_HOOK: &str = r#"
# Live VM names where a TARGET goes (machinen __vm-names).
_machinen_vms() {
    local cur="${COMP_WORDS[COMP_CWORD]}" sub="" i first_pos=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --) return 1 ;;
            -*) ;;
            *) if [[ -z "$sub" ]]; then sub="${COMP_WORDS[i]}"; else first_pos=1; fi ;;
        esac
    done
    [[ -n "$sub" && $first_pos -eq 0 && "$cur" != -* ]] || return 1
    case " @TARGETS@ " in *" $sub "*) ;; *) return 1 ;; esac
    local names
    names="$(command machinen __vm-names 2>/dev/null)"
    if [[ "$sub" == cp ]]; then
        COMPREPLY=($(compgen -W "$(printf '%s:/ ' $names)" -- "$cur") $(compgen -f -- "$cur"))
        compopt -o nospace 2>/dev/null
    else
        COMPREPLY=($(compgen -W "$names" -- "$cur"))
    fi
    return 0
}
_machinen_with_vms() {
    _machinen_vms || _machinen "$@"
}
complete -F _machinen_with_vms -o bashdefault -o default machinen
"#;

const ZSH_HOOK: &str = r#"
# Live VM names where a TARGET goes (machinen __vm-names).
_machinen_vms() {
    local -a vms
    vms=(${(f)"$(command machinen __vm-names 2>/dev/null)"})
    _describe -t vms 'VM' vms
}
"#;

const FISH_HOOK: &str = r#"
# Live VM names where a TARGET goes (machinen __vm-names).
complete -c machinen -n "__fish_seen_subcommand_from @TARGETS@" -f -a "(command machinen __vm-names 2>/dev/null)" -d VM
"#;

/// The completion script for `shell`.
pub fn script(shell: Shell) -> String {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    let cshell = match shell {
        Shell::Bash => CShell::Bash,
        Shell::Zsh => CShell::Zsh,
        Shell::Fish => CShell::Fish,
    };
    generate(cshell, &mut cmd, "machinen", &mut buf);
    let mut s = String::from_utf8_lossy(&buf).into_owned();
    let targets = TARGET_COMMANDS.join(" ");
    match shell {
        Shell::Bash => s.push_str(&BASH_HOOK.replace("@TARGETS@", &targets)),
        Shell::Zsh => {
            // The generated spec completes TARGET with files; point it at the VM list.
            s = s
                .lines()
                .map(|l| {
                    if l.contains(":target -- ") && l.contains(":_default'") {
                        l.replace(":_default'", ":_machinen_vms'")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            s.push('\n');
            // Define the helper before the generated code runs it.
            s = format!(
                "#compdef machinen\n{ZSH_HOOK}\n{}",
                s.trim_start_matches("#compdef machinen\n")
            );
        }
        Shell::Fish => s.push_str(&FISH_HOOK.replace("@TARGETS@", &targets)),
    }
    s
}

pub fn run(a: crate::args::CompletionArgs) -> machinen::Result<i32> {
    crate::out!("{}", script(a.shell));
    Ok(0)
}

/// `machinen __vm-names`: live VM names, one a line (quiet on errors).
pub fn vm_names() -> machinen::Result<i32> {
    if let Ok(vms) = machinen::list() {
        for v in vms {
            crate::outln!("{}", v.name);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_cover_commands_flags_and_vm_names() {
        for sh in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = script(sh);
            for word in [
                "attach",
                "exec",
                "cp",
                "repl",
                "mux",
                "agent-context",
                "tty",
                "secret-file",
                "__vm-names",
            ] {
                assert!(s.contains(word), "{sh:?} script lacks {word}");
            }
        }
        assert!(
            script(Shell::Zsh).contains(":_machinen_vms'"),
            "zsh completes TARGET with VM names"
        );
    }
}
