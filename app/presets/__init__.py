"""Presets of the paper's grid, composed from YAML: B0–B5 × {G1, G16} × {GN, LN+PN} × {native, half}.

A grid name reads ``b<k>-g<1|16>-<gn|lnpn>[-half]``. Its preset is ``_recipe.yaml`` (the paper's
training recipe) updated with the model's row of ``_models.yaml`` and the variant's rows of
``_variants.yaml``; ``-half`` trains at the model's half resolution (``app/resolution.py``).
"""

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from app.resolution import half_resolution

HERE = Path(__file__).parent
GRID = re.compile(r"b([0-5])-g(1|16)-(gn|lnpn)(-half)?")


def _read(name: str) -> Dict[str, Any]:
    return yaml.safe_load((HERE / name).read_text())


def deep_update(base: Dict[str, Any], updates: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in updates.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def grid_names() -> List[str]:
    return [
        f"b{k}-g{g}-{n}{h}" for k in range(6) for g in (1, 16) for n in ("gn", "lnpn") for h in ("", "-half")
    ]


def grid_preset(name: str) -> Optional[Dict[str, Any]]:
    m = GRID.fullmatch(name)
    if not m:
        return None
    k, g, norm, half = m.groups()
    models, variants = _read("_models.yaml"), _read("_variants.yaml")
    row = models[f"b{k}"]
    preset = deep_update(_read("_recipe.yaml"), row["preset"])
    preset = deep_update(preset, variants[f"g{g}"])
    preset = deep_update(preset, variants[norm])
    preset["model"]["name"] = f"b{k}"

    res = half_resolution(f"b{k}") if half else row["resolution"]
    preset["data"]["resolution"] = res
    preset["data"]["val_resolutions"] = [res]
    return preset
