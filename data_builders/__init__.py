"""TFDS builders, one per dataset (folder `data_builders/<name>/`), imported on first use."""

from __future__ import annotations

import importlib

# name -> "module:Class"; the name is also the TFDS dataset name (the folder under --data_dir).
BUILDERS = {
    "cuhk_pedes": "data_builders.cuhk_pedes:CuhkPedes",
    "icfg_pedes": "data_builders.icfg_pedes:IcfgPedes",
    "rstp_reid": "data_builders.rstp_reid:RstpReid",
    "luperson_mllm": "data_builders.luperson_mllm:LupersonMllm",
    "market1501": "data_builders.market1501:Market1501",
    "dukemtmc_reid": "data_builders.dukemtmc_reid:DukemtmcReid",
    "occluded_duke": "data_builders.occluded_duke:OccludedDuke",
    "msmt17": "data_builders.msmt17:Msmt17",
    "cuhk03_np": "data_builders.cuhk03_np:Cuhk03Np",
    "synthetic_pedestrians": "data_builders.synthetic_pedestrians:SyntheticPedestrians",
    "manifest": "data_builders.manifest:Manifest",  # your own dataset; its name is the config
}


def builder_class(name: str):
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    module, cls = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
