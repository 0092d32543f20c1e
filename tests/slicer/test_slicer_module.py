"""The Slicer extension's files, checked without a Slicer binary (Slicer cannot be installed here).

What this covers: the extension layout, the ``.ui`` file is Qt Designer XML, every ``self.ui.<name>``
the module uses exists in it with a widget class that has the properties used, the module compiles
and imports only names ``GCMLFederationLib`` exports, and CMake lists every script and resource.
What it cannot cover: that Slicer loads the module and draws it (see the extension README).
"""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[2] / "slicer_extension"
MOD = EXT / "GCMLFederation"
SOURCE = (MOD / "GCMLFederation.py").read_text()


@pytest.mark.parametrize("path", [
    "CMakeLists.txt", "README.md", "GCMLFederation/CMakeLists.txt", "GCMLFederation/GCMLFederation.py",
    "GCMLFederation/GCMLFederationLib/__init__.py", "GCMLFederation/Resources/UI/GCMLFederation.ui",
    "GCMLFederation/Resources/Icons/GCMLFederation.png", "GCMLFederation/Testing/Python/CMakeLists.txt",
])
def test_extension_layout(path):
    assert (EXT / path).is_file()


def test_extension_metadata():
    text = (EXT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", text), key
    assert "add_subdirectory(GCMLFederation)" in text
    assert (MOD / "Resources/Icons/GCMLFederation.png").read_bytes()[:4] == b"\x89PNG"


def _widgets() -> dict[str, str]:
    root = ET.parse(MOD / "Resources/UI/GCMLFederation.ui").getroot()
    assert root.tag == "ui" and root.find("class").text == "GCMLFederation"
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_every_ui_name_the_module_uses_exists_with_a_fitting_class():
    widgets = _widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE)) | set(re.findall(r"widget\.ui\.(\w+)", SOURCE))
    assert used, "the module uses no ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in GCMLFederation.py but not in the .ui: {missing}"
    kinds = {"Table": "QTableWidget", "Button": "QPushButton", "Label": "QLabel", "Edit": "QLineEdit",
             "ComboBox": "QComboBox", "ProgressBar": "QProgressBar", "Frame": "QFrame"}
    for name in used:
        suffix = next(k for k in kinds if name.endswith(k))
        assert widgets[name] == kinds[suffix], (name, widgets[name])


def test_ui_custom_widgets_are_declared():
    root = ET.parse(MOD / "Resources/UI/GCMLFederation.ui").getroot()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared


def test_module_compiles_and_has_the_four_classes(tmp_path):
    py_compile.compile(str(MOD / "GCMLFederation.py"), cfile=str(tmp_path / "m.pyc"), doraise=True)
    tree = ast.parse(SOURCE)
    classes = {c.name: [b.id for b in c.bases if isinstance(b, ast.Name)] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert classes == {
        "GCMLFederation": ["ScriptedLoadableModule"],
        "GCMLFederationWidget": ["ScriptedLoadableModuleWidget"],
        "GCMLFederationLogic": ["ScriptedLoadableModuleLogic"],
        "GCMLFederationTest": ["ScriptedLoadableModuleTest"],
    }


def test_module_imports_only_what_the_lib_exports():
    import sys

    sys.path.insert(0, str(MOD))
    import GCMLFederationLib
    import GCMLFederationLib.client

    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("GCMLFederationLib"):
            target = GCMLFederationLib if node.module == "GCMLFederationLib" else GCMLFederationLib.client
            for alias in node.names:
                assert hasattr(target, alias.name), f"{node.module} has no {alias.name}"


def test_logic_never_opens_dialogs_and_slots_report_errors():
    tree = ast.parse(SOURCE)
    logic = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "GCMLFederationLogic")
    assert not re.search(r"Display\(|QMessageBox", ast.get_source_segment(SOURCE, logic))
    widget = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "GCMLFederationWidget")
    slots = [f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name.startswith("on")]
    assert len(slots) >= 6
    for f in slots:
        assert "tryWithErrorDisplay" in ast.get_source_segment(SOURCE, f), f.name


def test_cmake_lists_every_lib_file_and_resource():
    text = (MOD / "CMakeLists.txt").read_text()
    for p in sorted((MOD / "GCMLFederationLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{p.name}" in text, p.name
    assert "Resources/Icons/${MODULE_NAME}.png" in text and "Resources/UI/${MODULE_NAME}.ui" in text
