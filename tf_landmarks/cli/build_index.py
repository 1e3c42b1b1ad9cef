r"""tfl-build-index: the retrieval and verification index of a classifier run.

Examples:
  tfl-build-index --run=runs/demo_finetune --local_features=sift
  tfl-build-index --run=gs://b/runs/r50_finetune --local_features=delf \
      --delf_run=gs://b/runs/r50_delf --output_dir=gs://b/index/gldv2 --split=train+validation
  tfl-build-index --run=runs/r50 --delf_run=runs/r50_delf --global_search=ivf --resume
  tfl-build-index --run=runs/r50 --delf_run=runs/r50_delf --runner=beam \
      --beam_pipeline_options=--direct_num_workers=4,--direct_running_mode=multi_processing

Stores, for every image of the run's records (the train split by default), the classifier's global
descriptor and the image's local features (DELF or SIFT) in sharded .npy files, with a per-image
table sorted by landmark; index.json, written last, marks a finished index. The layout and its
size for GLDv2 are in tf_landmarks/indexes.py. An interrupted build (Ctrl-C, SIGTERM,
a killed process) continues with --resume from its first unfinished shard; --resume of a finished
index does nothing. --runner=beam builds the shards as an Apache Beam pipeline (Dataflow, Flink,
Spark; README, "Google Landmarks v2 at full size"): the same files.
"""

from tf_landmarks.cli import common
from tf_landmarks import index_builder

common.define_flags(index_builder.IndexConfig)


def main() -> int:
  built = index_builder.build_index(common.from_flags(index_builder.IndexConfig))
  output_dir = common.FLAGS.output_dir or f'{common.FLAGS.run}/index'
  if built.get(index_builder.ALREADY_FINISHED):
    print(f'{output_dir} holds a finished index: nothing to resume, left as it is')
    return 0
  counts, local = built['counts'], built['local']
  print(f'Wrote {output_dir}: {counts["images"]} images of {counts["landmarks"]} landmarks '
        f'({", ".join(built["splits"])}) in {counts["shards"]} shard(s)')
  print(f'  local: {local["backend"]}, {counts["features"]} features '
        f'({counts["features"] / counts["images"]:.0f} per image), {local["descriptor_dim"]}-d '
        f'{local["descriptor_dtype"]}' + (', PCA' if local['pca'] else ''))
  print(f'  global: {built["global"]["dim"]}-d from {built["backbone"]} at {built["image_size"]} '
        f'px, {built["global"]["search"]["kind"]} search')
  return 0


def run():
  common.run(main, resume_hint=common.RESUME)


if __name__ == '__main__':
  run()
