"""Dataset microjob (CPU): a LeRobot dataset from an s3:// URI, a hub id or a folder; or MetaWorld expert
demonstrations generated once per settings. The data stays in the object store; the artifact carries its URI."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("eval"), install_kfp_package=False)
def prepare_dataset(source: str, results_uri: str, workdir: str, metaworld_tasks: str, metaworld_episodes: int,
                    image_size: int, workers: int, render_backend: str, dataset: Output[Dataset]):
    import json

    from vla_core.experiments import cells

    uri = cells.prepare_dataset(source, results_uri, workdir, tasks=metaworld_tasks, episodes=metaworld_episodes,
                                image_size=image_size, workers=workers, render_backend=render_backend)
    dataset.metadata["uri"] = uri
    with open(dataset.path, "w") as f:
        json.dump({"uri": uri}, f)
