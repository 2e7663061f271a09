//! `hvctl completions` and `hvctl man` on the built binary: the scripts and pages cover
//! every subcommand that `hvctl --help` lists, and bash accepts its script.

use std::process::Command;

mod common;

use common::{hvctl, stderr, stdout};

/// The top-level subcommands, as `hvctl --help` lists them (not a copy of the list).
fn subcommands() -> Vec<String> {
    let help = stdout(&hvctl(&["--help"]));
    let list = help.split("Commands:").nth(1).expect("--help lists the commands");
    let names: Vec<String> = list
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(String::from)
        .collect();
    assert!(names.len() >= 10 && names.iter().any(|n| n == "completions"), "{names:?}");
    names
}

#[test]
fn bash_completions_cover_every_subcommand_and_parse() {
    let o = hvctl(&["completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = stdout(&o);
    assert!(script.contains("complete -F _hvctl"), "not a bash completion script");
    for name in subcommands() {
        // Each is offered as a word after `hvctl`, and has its own case for its options.
        assert!(script.contains(&format!("hvctl,{name})")), "no completion case for {name}");
        assert!(script.split_whitespace().any(|w| w == name), "{name} is not offered");
    }
    // Nested: `dirty heatmap` completes its --format values.
    assert!(script.contains("png svg"), "heatmap --format values missing");
    let path = std::env::temp_dir().join(format!("hvctl-completion-{}.bash", std::process::id()));
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn other_shells_get_scripts_and_unknown_ones_are_refused() {
    for (shell, marker) in
        [("zsh", "#compdef hvctl"), ("fish", "complete -c hvctl"), ("elvish", "hvctl"), ("powershell", "hvctl")]
    {
        let o = hvctl(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        assert!(stdout(&o).contains(marker), "{shell}: no {marker}");
        assert!(stdout(&o).contains("heatmap"), "{shell}: subcommands missing");
    }
    let o = hvctl(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("tcsh"), "{}", stderr(&o));
}

#[test]
fn man_page_has_name_synopsis_and_the_subcommands() {
    let o = hvctl(&["man"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = stdout(&o);
    assert!(page.contains(".TH hvctl 1"), "no title header");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}");
    }
    for name in subcommands() {
        assert!(page.contains(&format!("hvctl\\-{}(1)", name.replace('-', "\\-"))), "{name} is not in SUBCOMMANDS");
    }
}

#[test]
fn man_out_writes_one_page_per_subcommand() {
    let dir = std::env::temp_dir().join(format!("hvctl-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = hvctl(&["man", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut pages: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    assert!(stdout(&o).starts_with(&format!("{} man pages written to", pages.len())), "{}", stdout(&o));
    assert!(pages.contains(&"hvctl.1".to_string()));
    for name in subcommands() {
        assert!(pages.contains(&format!("hvctl-{name}.1")), "no page for {name}: {pages:?}");
    }
    // Nested subcommands get pages too, and each page names its command.
    let heatmap = std::fs::read_to_string(dir.join("hvctl-dirty-heatmap.1")).unwrap();
    assert!(heatmap.contains(".SH NAME") && heatmap.contains("\\-\\-format"), "{heatmap}");
    assert!(!pages.iter().any(|p| p.contains("help")), "clap's help subcommand got a page: {pages:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
