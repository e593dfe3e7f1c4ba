#!/usr/bin/env python3
"""Render swift-argument-parser's `--experimental-dump-help` JSON as a man(7) page, section 1.

Usage: scsigate --experimental-dump-help | help-to-man.py --date YYYY-MM-DD --version V > scsigate.1
One page: NAME, SYNOPSIS, DESCRIPTION, then every subcommand (nested ones as "lun add") with its
arguments and options, in the order the command definitions give them. Hidden arguments and the
generated `help` subcommand are left out.
"""
import argparse
import json
import sys


def esc(text):
    """Escape text for roff: backslashes, and a leading dot or quote on any line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    out = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def arg_synopsis(arg):
    """The argument as it is typed: --name <value>, -h|--help, <positional>..."""
    value = "<%s>" % arg.get("valueName", "value")
    if arg["kind"] == "positional":
        text = value
    else:
        names = []
        for n in arg.get("names", []):
            names.append(("-" if n["kind"] in ("short", "longWithSingleDash") else "--") + n["name"])
        text = "|".join(names)
        if arg["kind"] == "option":
            text += " " + value
    if arg.get("isRepeating"):
        text += " ..."
    return text


def visible(items):
    return [i for i in items if i.get("shouldDisplay", True)]


def own_arguments(cmd):
    """The command's arguments without the --version and -h/--help flags every command gets."""
    return [a for a in visible(cmd.get("arguments", []))
            if not (a["kind"] == "flag" and {n["name"] for n in a.get("names", [])} & {"version", "help"})]


def subcommands(cmd):
    return [s for s in visible(cmd.get("subcommands", [])) if s["commandName"] != "help"]


def leaves(cmd, path):
    """Every runnable command path (commands without subcommands), in definition order."""
    subs = subcommands(cmd)
    if not subs:
        return [path]
    return [p for s in subs for p in leaves(s, path + [s["commandName"]])]


def command_section(cmd, path, lines):
    args = own_arguments(cmd)
    subs = subcommands(cmd)
    name = " ".join(path)
    if path[1:]:
        lines.append(".SS " + esc(name))
        usage = " ".join(("[%s]" if a.get("isOptional") else "%s") % arg_synopsis(a) for a in args)
        lines.append(".B " + esc(name))
        if usage:
            lines.append(esc(usage))
        lines.append(".PP")
        if cmd.get("abstract"):
            lines.append(esc(cmd["abstract"]))
        if cmd.get("discussion"):
            lines.append(".PP")
            lines.append(esc(cmd["discussion"]))
        for a in args:
            lines.append(".TP")
            lines.append(".B " + esc(arg_synopsis(a)))
            text = a.get("abstract", "")
            if a.get("allValues"):
                text += " (values: %s)" % ", ".join(a["allValues"])
            if a.get("defaultValue") not in (None, ""):
                text += " (default: %s)" % a["defaultValue"]
            lines.append(esc(text.strip()) or "\\&")
    for s in subs:
        command_section(s, path + [s["commandName"]], lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--date", required=True)
    p.add_argument("--version", required=True)
    opts = p.parse_args()
    root = json.load(sys.stdin)["command"]
    name = root["commandName"]
    lines = [
        '.TH %s 1 "%s" "%s %s" "User Commands"' % (name.upper(), opts.date, name, opts.version),
        ".SH NAME",
        "%s \\- %s" % (name, esc(root.get("abstract", ""))),
        ".SH SYNOPSIS",
    ]
    subs = subcommands(root)
    for path in leaves(root, [name]):
        lines.append(".B " + esc(" ".join(path)))
        lines.append("[options]")
        lines.append(".br")
    lines += [".br", ".B %s --version" % name, ".br", ".B %s help" % name, "[command]",
              ".SH DESCRIPTION", esc(root.get("abstract", ""))]
    if root.get("discussion"):
        lines += [".PP", esc(root["discussion"])]
    lines.append(".SH COMMANDS")
    for s in subs:
        command_section(s, [name, s["commandName"]], lines)
    lines += [
        ".SH FILES",
        ".TP",
        ".I /etc/scsigate/scsigate.toml",
        "The configuration `scsigate.service` serves (every key is documented in it).",
        ".TP",
        ".I /run/scsigate/control.sock",
        "The control socket of the admin commands (default).",
        ".SH SEE ALSO",
        ".BR systemctl (1),",
        ".BR virsh (1),",
        "/usr/share/doc/scsigate/README.md",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
