"""The built-in demo scene as a dataset: rendered by process_data/synthetic.py into the NeuS
format on first use (cached in root_dir), then loaded like any NeuS-format scene."""
from dataclasses import dataclass

from process_data.dtu import DTUDataset
from process_data.registry import DATASETS
from process_data.synthetic import make_demo_scene


@DATASETS.register("demo")
class DemoDataset(DTUDataset):
    @dataclass
    class Config(DTUDataset.Config):
        name: str = "demo"
        root_dir: str = "./inputs/demo_scene"
        img_downscale: float = 1.0
        n_views: int = 48
        width: int = 400
        height: int = 300

    def __init__(self, config: "DemoDataset.Config", device="cpu"):
        make_demo_scene(config.root_dir, n_views=config.n_views, width=config.width, height=config.height)
        super().__init__(config, device)
