"""GCML Federation: what this site's federated model is doing, for radiologists and site IT.

A thin Slicer module over ``GCMLFederationLib`` (plain Python, covered by the project's pytest):
the widget polls the site's MONAI Label server in a background thread (``Poller``) driven by a
``qt.QTimer`` and never waits on the network in a GUI slot; the logic holds the HTTP client and
never opens dialogs; the test runs the logic against a live server.
"""

import logging
import os

import qt
import slicer
import vtk
from GCMLFederationLib import (
    FederationClient,
    Poller,
    active_rows,
    active_text,
    dice_series,
    interactive_text,
    labels_text,
    partner_rows,
    rollback_choices,
    round_rows,
    served_text,
    server_url_from_settings,
    training_text,
    working_text,
)
from GCMLFederationLib.client import OWN_URL_KEY
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class GCMLFederation(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GCML Federation"
        self.parent.categories = ["Active Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["GCML app team"]
        self.parent.helpText = (
            "Shows this site's federated segmentation model: the version served and its validation Dice on "
            "this site's own labels, recent gossip rounds, partners, and labels not yet learned from. "
            "Sync now, pause or resume gossip, or roll back to an earlier version. The cases where this "
            "site's model and its partners' models disagree most are listed: label those first (Next Sample, "
            "strategy disagreement). Annotate with the MONAI Label module as usual; this module uses the same server."
        )
        self.parent.acknowledgementText = (
            "Gossip contrastive mutual learning: Chen and Yuan, IEEE TMI 2025 (arXiv 2503.03883). "
            "Built on MONAI Label and 3D Slicer."
        )


class GCMLFederationWidget(ScriptedLoadableModuleWidget):
    """GUI only: shows what the logic fetched, forwards button presses to the logic."""

    TIMER_MS = 500
    POLL_S = 5.0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GCMLFederation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = GCMLFederationLogic()
        self.poller = None
        self.status, self.history = None, []
        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.plotFrame.layout().addWidget(self.plotWidget)

        self.ui.serverUrlEdit.text = server_url_from_settings(lambda k: qt.QSettings().value(k, ""))
        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.serverUrlEdit.returnPressed.connect(self.onConnect)
        self.ui.syncButton.clicked.connect(self.onSync)
        self.ui.pauseButton.clicked.connect(self.onPause)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.rollbackButton.clicked.connect(self.onRollback)
        self.ui.openTopButton.clicked.connect(self.onOpenTop)
        for table in (self.ui.roundsTable, self.ui.partnersTable, self.ui.activeTable):
            table.horizontalHeader().setStretchLastSection(True)
            table.verticalHeader().setVisible(False)
        self._setActionsEnabled(False)

        self.timer = qt.QTimer()
        self.timer.setInterval(self.TIMER_MS)
        self.timer.timeout.connect(self.onTimer)
        if self.ui.serverUrlEdit.text:
            self.onConnect()

    def enter(self):
        if self.poller is not None:
            self.timer.start()  # poll only while the module is shown

    def exit(self):
        self.timer.stop()

    def cleanup(self):
        self.timer.stop()

    # ------------------------------------------------------------------ slots
    def onConnect(self):
        with slicer.util.tryWithErrorDisplay("Cannot use this server URL.", waitCursor=True):
            url = self.ui.serverUrlEdit.text.strip()
            self.logic.connect(url)
            qt.QSettings().setValue(OWN_URL_KEY, url)
            self.poller = Poller(self.logic.fetch, self.POLL_S)
            self.poller.tick(force=True)
            self.ui.connectionLabel.text = f"Connecting to {url} ..."
            self.timer.start()

    def onTimer(self):
        with slicer.util.tryWithErrorDisplay("Could not show the server's state; press Connect to retry."):
            if self.poller is None:
                return
            self.poller.tick()
            got = self.poller.take()
            if got is None:
                return
            result, error = got
            if error is not None:  # network trouble: shown in place, polling goes on
                self.ui.connectionLabel.text = f"Not connected: {error}"
                self._setActionsEnabled(False)
                return
            try:
                self.showState(*result)
            except Exception:
                self.timer.stop()  # one error dialog, not one every tick
                raise

    def onSync(self):
        with slicer.util.tryWithErrorDisplay("Sync failed.", waitCursor=True):
            task = self.logic.sync()
            self.ui.statusLabel.text = f"Gossip round {task['round_id']} started."
            self.poller.tick(force=True)

    def onPause(self):
        with slicer.util.tryWithErrorDisplay("Pause failed.", waitCursor=True):
            self.logic.pause()
            self.ui.statusLabel.text = "Scheduled gossip rounds paused."
            self.poller.tick(force=True)

    def onResume(self):
        with slicer.util.tryWithErrorDisplay("Resume failed.", waitCursor=True):
            self.logic.resume()
            self.ui.statusLabel.text = "Scheduled gossip rounds resumed."
            self.poller.tick(force=True)

    def onRollback(self):
        with slicer.util.tryWithErrorDisplay("Rollback failed.", waitCursor=True):
            version = self.ui.rollbackComboBox.currentData
            if version is None:
                return
            served = (self.status or {}).get("served") or {}
            question = (f"Serve version {version} again instead of version {served.get('version')}?\n\n"
                        "Auto-segmentation switches at the next request. Later rounds start from the version served.")
            if not slicer.util.confirmOkCancelDisplay(question, windowTitle="Roll back the served model"):
                return
            result = self.logic.rollback(int(version), reason="rolled back from Slicer")
            self.ui.statusLabel.text = f"Now serving version {result['version']}."
            self.poller.tick(force=True)

    def onOpenTop(self):
        """The top case through the MONAI Label module's own Next Sample (its download, scene and labels),
        with the ``disagreement`` strategy selected there."""
        with slicer.util.tryWithErrorDisplay("Could not open the top case in the MONAI Label module.", waitCursor=True):
            module = getattr(slicer.modules, "monailabel", None)
            if module is None:
                raise RuntimeError("the MONAI Label module is not installed; install the MONAILabel extension")
            stock = module.widgetRepresentation().self()  # the MONAI Label module's widget
            slicer.util.selectModule("MONAILabel")
            box = stock.ui.strategyBox
            index = box.findText("disagreement")
            if index < 0:
                raise RuntimeError("the MONAI Label module lists no 'disagreement' strategy: press its refresh "
                                   "button (the server must run the GCML app)")
            box.setCurrentIndex(index)
            stock.onNextSampleButton()

    # ------------------------------------------------------------------ display
    def showState(self, status, history):
        """Fill every section from one ``/gcml/status`` and ``/gcml/history`` answer."""
        self.status, self.history = status, history
        self.ui.connectionLabel.text = f"Connected to {self.logic.client.url} (site {status.get('site')})"
        self.ui.servedLabel.text = (served_text(status, history) + "\n" + working_text(status) + "\n"
                                    + interactive_text(status))
        self._fillTable(self.ui.roundsTable, round_rows(history), ["time", "trigger", "peer", "result", "bytes"])
        self._fillTable(self.ui.partnersTable, partner_rows(status),
                        ["name", "reachable", "last_exchange", "score", "note"])
        self.ui.labelsLabel.text = labels_text(status)
        self.ui.activeLabel.text = active_text(status)
        top = active_rows(status)
        self._fillTable(self.ui.activeTable, top, ["case", "score", "partners"])
        self.ui.openTopButton.enabled = bool(top)
        text, percent = training_text(status)
        self.ui.trainingLabel.text = text
        self.ui.trainingProgressBar.visible = percent is not None
        self.ui.trainingProgressBar.value = percent or 0
        combo = self.ui.rollbackComboBox
        combo.clear()
        for version, label in rollback_choices(status, history):
            combo.addItem(label, version)
        self._setActionsEnabled(True)
        paused = bool((status.get("gossip") or {}).get("paused"))
        self.ui.pauseButton.enabled, self.ui.resumeButton.enabled = not paused, paused
        self.ui.syncButton.enabled = not (status.get("training") or {}).get("running")
        self.ui.rollbackButton.enabled = combo.count > 0
        self._updatePlot(dice_series(history))

    def _setActionsEnabled(self, enabled):
        for b in (self.ui.syncButton, self.ui.pauseButton, self.ui.resumeButton, self.ui.rollbackButton,
                  self.ui.openTopButton):
            b.enabled = enabled

    @staticmethod
    def _fillTable(table, rows, keys):
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, key in enumerate(keys):
                item = qt.QTableWidgetItem(row[key])
                item.setToolTip(row[key])
                table.setItem(i, j, item)
        table.resizeColumnsToContents()

    def _updatePlot(self, series):
        """Validation Dice per label across versions, as Slicer plot nodes (one table, one series per label)."""
        chart = self.logic.plotNodes(series)
        if chart is None:
            return
        view = self.plotWidget.mrmlPlotViewNode()
        if view is None or slicer.mrmlScene.GetNodeByID(view.GetID()) is None:
            view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "GCML validation Dice view")
            self.plotWidget.setMRMLPlotViewNode(view)
        view.SetPlotChartNodeID(chart.GetID())


class GCMLFederationLogic(ScriptedLoadableModuleLogic):
    """Usable without a GUI: the site's HTTP client and the plot nodes. Never opens dialogs.

    Args:
        log: progress/messages callback (default: ``logging.info``).
    """

    def __init__(self, log=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = None
        self.log = log or logging.info
        self._table = self._chart = None
        self._series = {}

    def connect(self, url, timeout=5.0):
        """Use the server at ``url`` (raises ``ValueError`` for a malformed URL)."""
        self.client = FederationClient(url, timeout=timeout)
        self.log(f"GCML Federation: using {self.client.url}")

    def _need(self):
        if self.client is None:
            raise ValueError("no server: connect to this site's MONAI Label server first")
        return self.client

    def fetch(self):
        """``(status, history)``; runs in the poller's thread."""
        client = self._need()
        return client.status(), client.history()

    def sync(self):
        task = self._need().sync()
        self.log(f"GCML Federation: gossip round {task['round_id']} started")
        return task

    def pause(self):
        return self._need().pause()

    def resume(self):
        return self._need().resume()

    def rollback(self, version, reason=""):
        result = self._need().rollback(version, reason)
        self.log(f"GCML Federation: now serving version {result['version']}")
        return result

    def plotNodes(self, series):
        """Create or update the table, series and chart nodes for ``dice_series`` output; returns the chart."""
        if not series:
            return None
        if self._table is None or slicer.mrmlScene.GetNodeByID(self._table.GetID()) is None:
            self._table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "GCML validation Dice")
            self._chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", "GCML validation Dice")
            self._chart.SetTitle("Validation Dice across versions")
            self._chart.SetXAxisTitle("version")
            self._chart.SetYAxisTitle("Dice")
            self._series = {}
        table = self._table.GetTable()
        table.Initialize()
        versions = sorted({v for points in series.values() for v, _ in points})
        column = vtk.vtkDoubleArray()
        column.SetName("version")
        table.AddColumn(column)
        for name, points in series.items():
            col = vtk.vtkDoubleArray()
            col.SetName(name)
            table.AddColumn(col)
        table.SetNumberOfRows(len(versions))
        for i, v in enumerate(versions):
            table.SetValue(i, 0, v)
            for j, points in enumerate(series.values(), start=1):
                table.SetValue(i, j, dict(points).get(v, float("nan")))
        self._table.Modified()
        for name in series:
            node = self._series.get(name)
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"GCML Dice {name}")
                node.SetAndObserveTableNodeID(self._table.GetID())
                node.SetXColumnName("version")
                node.SetYColumnName(name)
                node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                self._chart.AddAndObservePlotSeriesNodeID(node.GetID())
                self._series[name] = node
        return self._chart


class GCMLFederationTest(ScriptedLoadableModuleTest):
    """Runs the logic against a live GCML site.

    Start one (``gcml demo --no-wait`` leaves none running; use ``gcml demo``, which serves until
    Ctrl-C), then in Slicer's Python console::

        os.environ["GCML_TEST_SERVER_URL"] = "http://127.0.0.1:8001"
        slicer.util.selectModule("GCMLFederation"); slicer.modules.GCMLFederationWidget.onReload()
        import GCMLFederation; GCMLFederation.GCMLFederationTest().runTest()
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_against_server()

    def test_logic_against_server(self):
        url = os.environ.get("GCML_TEST_SERVER_URL")
        self.assertTrue(url, "set GCML_TEST_SERVER_URL to a running GCML site, e.g. http://127.0.0.1:8001")
        messages = []
        logic = GCMLFederationLogic(log=messages.append)
        logic.connect(url)
        status, history = logic.fetch()
        self.assertIn("site", status)
        self.assertIn("partners", status)
        self.delayDisplay(served_text(status, history).splitlines()[0])

        was_paused = bool(status["gossip"]["paused"])
        logic.pause()
        self.assertTrue(logic.fetch()[0]["gossip"]["paused"])
        logic.resume()
        self.assertFalse(logic.fetch()[0]["gossip"]["paused"])
        if was_paused:
            logic.pause()

        chart = logic.plotNodes(dice_series(history))
        if status.get("served") and status["served"].get("val_dice"):
            self.assertIsNotNone(chart)
            self.assertGreater(logic._table.GetTable().GetNumberOfRows(), 0)

        widget = slicer.modules.gcmlfederation.widgetRepresentation().self()
        widget.showState(status, history)
        self.assertEqual(widget.ui.partnersTable.rowCount, len(status["partners"]))
        self.delayDisplay("GCML Federation logic test passed")
