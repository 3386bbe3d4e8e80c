"""The lab's page, served by `panel serve lab/app.py` (assembled in lab/page.py)."""
import panel as pn

pn.extension()
pn.pane.Markdown("# Serving Lab\nThe concept page is being built; the engine runs from "
                 "`python -m engine run`.").servable(title="Serving Lab")
