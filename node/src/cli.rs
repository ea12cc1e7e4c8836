//! Command-line help that shows each flag's default: the value the
//! configuration has when neither the flag nor the file sets it.

use clap::Command;
use serde_json::Value;

/// `cmd` (and its subcommands) with `[default: …]` after the help of every
/// flag named like a field of `defaults` (a configuration's defaults, as
/// JSON). Fields without a value (none, empty) are left alone.
pub fn with_defaults(cmd: Command, defaults: &Value) -> Command {
    let Some(fields) = defaults.as_object() else {
        return cmd;
    };
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut cmd = cmd;
    for name in subcommands {
        cmd = cmd.mut_subcommand(name, |s| with_defaults(s, defaults));
    }
    let ids: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        let shown = match fields.get(&id) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if s.is_empty() => continue,
            Some(Value::Array(a)) if a.is_empty() => continue,
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        cmd = cmd.mut_arg(id, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            let long = a.get_long_help().map(ToString::to_string);
            let a = a.help(format!("{help} [default: {shown}]"));
            match long {
                Some(long) => a.long_help(format!("{long} [default: {shown}]")),
                None => a,
            }
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Arg;

    #[test]
    fn flags_named_like_fields_show_their_defaults() {
        let cmd = Command::new("t")
            .arg(Arg::new("ready_slots").long("ready-slots").help("Slots"))
            .arg(Arg::new("owner").long("owner").help("Secret"))
            .subcommand(Command::new("check").arg(Arg::new("ready_slots").long("ready-slots")));
        let defaults = serde_json::json!({"ready_slots": 4, "owner": null});
        let mut cmd = with_defaults(cmd, &defaults);
        let help = cmd.render_help().to_string();
        assert!(help.contains("Slots [default: 4]"), "{help}");
        assert!(!help.contains("Secret [default"), "{help}");
        let sub = cmd
            .find_subcommand_mut("check")
            .expect("check")
            .render_help()
            .to_string();
        assert!(sub.contains("[default: 4]"), "{sub}");
    }
}
