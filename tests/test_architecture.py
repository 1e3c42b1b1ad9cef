"""The package's layering, read from the code: stages import artifacts and libraries, never each other.

A stage is the library behind one command. Stages meet only through the artifacts they write and
read (records, runs, indexes, exports, predictions), each owned by one module; so a stage can be
changed, run on Beam or replaced without the others noticing.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'tf_landmarks'

STAGES = {'ingest', 'ingest_beam', 'train', 'index_builder', 'index_beam', 'export', 'predict',
          'predict_beam', 'evaluation', 'serve'}
# A stage's Beam runner is that stage run another way: it reuses the local stage's pieces (the
# records build's, the index build's, batch prediction's step), and the local stage hands
# `--runner=beam` to it (imported lazily: Beam is an optional extra).
ALLOWED_STAGE_IMPORTS = {('ingest_beam', 'ingest'), ('ingest', 'ingest_beam'),
                         ('index_beam', 'index_builder'), ('index_builder', 'index_beam'),
                         ('predict_beam', 'predict'), ('predict', 'predict_beam')}
ARTIFACTS = {'records', 'runs', 'indexes', 'exports', 'predictions'}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, top_level_only: bool):
  """The tf_landmarks modules `path` imports (without the package prefix)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and \
        node.module.startswith('tf_landmarks'):
      base = node.module[len('tf_landmarks'):].lstrip('.')
      for alias in node.names:
        name = f'{base}.{alias.name}' if base else alias.name
        found.add(name if (PACKAGE / name.replace('.', '/')).with_suffix('.py').exists() or
                  (PACKAGE / name.replace('.', '/')).is_dir() else base)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('tf_landmarks.'):
          found.add(alias.name[len('tf_landmarks.'):])
  return {name for name in found if name}


def _graph(top_level_only: bool):
  return {_module_name(path): _imports(path, top_level_only)
          for path in PACKAGE.rglob('*.py') if 'cli' not in path.relative_to(PACKAGE).parts}


def _reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    for name in graph.get(todo.pop(), ()):
      if name not in seen:
        seen.add(name)
        todo.append(name)
  return seen


def test_every_stage_and_artifact_module_exists():
  for name in STAGES | ARTIFACTS:
    assert (PACKAGE / f'{name}.py').exists(), name


def test_no_stage_reaches_another_stage_even_through_libraries():
  graph = _graph(top_level_only=False)
  for stage in STAGES:
    reached = {name for name in _reachable(graph, stage) if name in STAGES} - {stage}
    reached -= {other for source, other in ALLOWED_STAGE_IMPORTS if source == stage}
    assert not reached, f'{stage} imports the stage(s) {sorted(reached)}'


def test_artifacts_models_and_local_features_import_no_stage():
  graph = _graph(top_level_only=False)
  for name in graph:
    if name in ARTIFACTS or name.startswith(('models', 'local_features')):
      assert not (_reachable(graph, name) & STAGES), name


def test_module_level_imports_have_no_cycle():
  graph = _graph(top_level_only=True)
  for name in graph:
    assert name not in _reachable(graph, name), f'{name} imports itself through a cycle'
