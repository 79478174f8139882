"""The analysis sections of a dataset card (``README.md``): what ``hsface analyze`` writes there
between HTML comment markers, and how a regenerated card keeps them (:mod:`builder.card`)."""

from __future__ import annotations

import re

__all__ = ["analysis_sections", "card_section", "replace_card_section"]


def _markers(config: str) -> tuple[str, str]:
    return f"<!-- hsface-analyze:{config}:start -->", f"<!-- hsface-analyze:{config}:end -->"


def analysis_sections(card: str) -> dict[str, str]:
    """{config: section body} of every analysis section in ``card`` (markers excluded).

    For card writers that regenerate ``README.md``: carry these over with :func:`replace_card_section`.
    """
    sections = {}
    for match in re.finditer(r"<!-- hsface-analyze:(.+?):start -->\n(.*?)<!-- hsface-analyze:\1:end -->", card, re.DOTALL):
        sections[match.group(1)] = match.group(2)
    return sections


def replace_card_section(card: str, config: str, body: str) -> str:
    """``card`` with the analysis section of ``config`` set to ``body`` (between its markers).

    An existing section is replaced in place; otherwise the section goes before ``## Citation``,
    or at the end. Running it twice gives the same card as running it once.
    """
    start, end = _markers(config)
    section = f"{start}\n{body.strip()}\n{end}\n"
    if card.count(start) != card.count(end) or card.count(start) > 1:
        raise ValueError(
            f"the card has {card.count(start)} start and {card.count(end)} end markers for {config!r}; "
            f"remove the broken '{start}' ... '{end}' block by hand and run again"
        )
    if start in card:
        head, rest = card.split(start, 1)
        tail = rest.split(end, 1)[1]
        return head + section.rstrip("\n") + tail
    citation = card.find("\n## Citation")
    if citation >= 0:
        return card[: citation + 1] + section + "\n" + card[citation + 1 :]
    return card.rstrip("\n") + "\n\n" + section


def card_section(report: dict, config: str, summary_md: str, files: list[str], analysis_dir: str = "analysis") -> str:
    """The ``## Analysis (`config`)`` section of a report: its summary, with links relative to the card."""
    from .card import public_model_name  # the card is published: a local recognizer path shows by name only

    prefix = f"{config}/{analysis_dir}"
    recognizer = report["recognizer"]
    lines = [f"## Analysis (`{config}`)", ""]
    if recognizer["random_weights"]:
        lines += [f"> **Random-weight recognizer (`{recognizer['source']}`): these numbers say nothing about face identity.** "
                  "For smoke runs only.", ""]
    lines += [
        f"Features of {report['num_images']:,} images from recognizer `{public_model_name(recognizer['source'])}` "
        f"(weights sha256 `{recognizer['sha256'][:16]}…`), computed by `hsface analyze`. "
        f"Full report: [{prefix}/report.json]({prefix}/report.json).",
    ]
    if recognizer.get("same_as_generation"):
        lines[-1] += " This is the recognizer that guided the generation, so the numbers are optimistic."
    # the library's summary, one heading level down and with links relative to the card
    for line in summary_md.splitlines()[1:]:
        if line.startswith("#"):
            line = "#" + line
        elif line.startswith("!["):
            name = line[line.index("(") + 1 : line.rindex(")")]
            line = f"![{name}]({prefix}/{name})"
        lines.append(line)
    if "sample_grid.png" in files:
        lines += ["", f"![samples of the first identities]({prefix}/sample_grid.png)"]
    return "\n".join(lines).strip() + "\n"
