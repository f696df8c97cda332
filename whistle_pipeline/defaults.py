"""The packaged pipeline.toml as text: the commented defaults of the sections a stage reads, a starting point
for a `--config my.toml` (`whistle config train-tle --output my.toml`, as torchtune's `tune cp`)::

    text = stage_defaults("train-tle")   # [teacher], [store], [tle], [train_tle] with their comments
    load_config(path_of_that_text) == load_config()
"""

from __future__ import annotations

import re

from whistle_pipeline.config import DEFAULT_CONFIG_PATH

# The sections each stage reads (through its config and the helpers it calls): finetune reads [data] and
# [evaluate] for val_audio (how to read the set, batch size, beams, outliers); evaluate reads [data] the same way.
STAGE_SECTIONS = {
    "precompute": ("teacher", "data", "store", "precompute"),
    "train-tle": ("teacher", "store", "tle", "train_tle"),
    "finetune": ("teacher", "data", "finetune", "evaluate"),
    "evaluate": ("teacher", "data", "evaluate"),
    "validate-tle": ("teacher",),
}
SECTION_HEADER = re.compile(r"^\[(\w+)\]\s*$", re.MULTILINE)


def default_sections() -> tuple[str, dict[str, str]]:
    """(the file's opening comment, {section: its text from the [header] line on, comments kept})."""
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    headers = list(SECTION_HEADER.finditer(text))
    ends = [header.start() for header in headers[1:]] + [len(text)]
    return text[: headers[0].start()].rstrip(), {
        header.group(1): text[header.start() : end].rstrip() for header, end in zip(headers, ends)
    }


def stage_defaults(stage: str | None = None) -> str:
    """The commented defaults of the sections `stage` reads (see STAGE_SECTIONS), or the whole file (None)."""
    opening, sections = default_sections()
    if stage is None:
        return "\n\n".join([opening, *sections.values()]) + "\n"
    names = STAGE_SECTIONS[stage]
    intro = (
        f"# The defaults of the sections `whistle {stage}` reads: {', '.join(f'[{n}]' for n in names)}\n"
        "# (from the packaged pipeline.toml). Keep the keys you change, delete the rest, and pass the file\n"
        f"# with `whistle {stage} --config FILE`."
    )
    return "\n\n".join([intro, *(sections[name] for name in names)]) + "\n"
