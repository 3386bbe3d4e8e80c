"""The research room: tie an open question and one next action to an object of the page, and get a
copy-ready prompt that carries the page's object key and the demo's current settings.

The draft (question and next action) is kept in the learner's browser only: `DraftEditor`'s own
script writes it to `localStorage` on every edit and restores it on load. The server sees the two
fields as this session's widget values, to fill the prompt, and stores them nowhere else.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import panel as pn
import param

CSS = """
:host {display: block; width: 100%;}
label {display: block; font-weight: 600; margin: 8px 0 2px;}
textarea, input, pre {font-weight: normal; margin-top: 2px; box-sizing: border-box; width: 100%; font: inherit; color: inherit;
  background: transparent; border: 1px solid color-mix(in srgb, currentColor 35%, transparent);
  border-radius: 6px; padding: 6px 8px;}
pre {white-space: pre-wrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  font-size: .85rem; margin: 0 0 6px;}
button {font: inherit; color: inherit; background: transparent; cursor: pointer;
  border: 1px solid color-mix(in srgb, currentColor 45%, transparent); border-radius: 6px;
  padding: 4px 12px;}
.status {font-size: .88rem; opacity: .85; margin: 6px 0; display: flex; gap: 12px;
  align-items: center; flex-wrap: wrap;}
"""


class DraftEditor(pn.custom.JSComponent):
    """An open question and a next action, saved to and restored from localStorage by the
    browser; the server only mirrors the two fields for this session."""

    question = param.String(default="", doc="The open question (mirrors the browser's draft).")
    next_action = param.String(default="", doc="One next action (mirrors the browser's draft).")
    default_question = param.String(default="", doc="The question shown when no draft exists.")
    storage_key = param.String(default="", doc="The localStorage key of the draft.")
    labels = param.Dict(default={
        "question": "Open question", "next_action": "One next action",
        "placeholder": "For example: rerun with batch 32 and compare TPOT",
        "saved": "Draft saved in this browser.", "empty": "No draft saved in this browser yet.",
        "refused": "This browser refuses to save the draft.", "clear": "Clear draft"},
        doc="The editor's visible words.")

    _esm = """
    export function render({ model, el }) {
      const L = model.labels;
      const make = (tag, props) => Object.assign(document.createElement(tag), props);
      const question = make('textarea', {rows: 3, className: 'draft-question'});
      const action = make('input', {type: 'text', className: 'draft-action',
                                    placeholder: L.placeholder});
      const status = make('span', {className: 'draft-status'});
      status.setAttribute('role', 'status');
      status.setAttribute('aria-live', 'polite');
      const clear = make('button', {type: 'button', textContent: L.clear});
      const field = (text, input) => { const l = make('label', {}); l.append(text, input); return l; };
      const push = () => { model.question = question.value; model.next_action = action.value; };
      const save = () => {
        const entry = {question: question.value, next_action: action.value,
                       saved_at: new Date().toISOString()};
        try { localStorage.setItem(model.storage_key, JSON.stringify(entry));
              status.textContent = L.saved; }
        catch (e) { status.textContent = L.refused; }
      };
      let saved = null;
      try { saved = JSON.parse(localStorage.getItem(model.storage_key) || 'null'); } catch (e) {}
      if (saved) {
        question.value = saved.question || '';
        action.value = saved.next_action || '';
        push();
        status.textContent = L.saved;
      } else {
        question.value = model.question || model.default_question;
        action.value = model.next_action;
        status.textContent = L.empty;
      }
      for (const input of [question, action]) {
        input.addEventListener('input', () => { push(); save(); });
      }
      clear.addEventListener('click', () => {
        try { localStorage.removeItem(model.storage_key); } catch (e) {}
        question.value = model.default_question;
        action.value = '';
        push();
        status.textContent = L.empty;
      });
      const row = make('div', {className: 'status'});
      row.append(status, clear);
      el.append(field(L.question, question), field(L.next_action, action), row);
    }"""

    def __init__(self, **params: Any) -> None:
        params.setdefault("stylesheets", [CSS])
        params.setdefault("margin", (5, 10))
        super().__init__(**params)
        if not self.question:
            self.question = self.default_question


class CopyBox(pn.custom.JSComponent):
    """A block of text with a button that copies it to the clipboard."""

    text = param.String(default="", doc="The text shown and copied.")

    _esm = """
    export function render({ model, el }) {
      const out = Object.assign(document.createElement('pre'), {tabIndex: 0,
                                                               textContent: model.text});
      const copy = Object.assign(document.createElement('button'),
                                 {type: 'button', textContent: 'Copy prompt'});
      const msg = document.createElement('span');
      msg.setAttribute('role', 'status');
      msg.setAttribute('aria-live', 'polite');
      model.on('text', () => { out.textContent = model.text; });
      const done = () => { msg.textContent = 'Copied.';
                           setTimeout(() => { msg.textContent = ''; }, 2000); };
      const fallback = () => {  // plain http on another host has no navigator.clipboard
        const t = Object.assign(document.createElement('textarea'), {value: model.text});
        document.body.appendChild(t);
        t.select();
        const ok = document.execCommand('copy');
        t.remove();
        if (ok) { done(); } else { msg.textContent = 'Copy failed: select the text above.'; }
      };
      copy.addEventListener('click', () => {
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(model.text).then(done, fallback);
        } else { fallback(); }
      });
      const row = Object.assign(document.createElement('div'), {className: 'status'});
      row.append(copy, msg);
      el.append(out, row);
    }"""

    def __init__(self, **params: Any) -> None:
        params.setdefault("stylesheets", [CSS])
        params.setdefault("margin", (5, 10))
        super().__init__(**params)


def fill_prompt(research: Mapping[str, Any], object_kind: str, object_label: str,
                question: str, next_action: str, demo_state: str) -> str:
    """The research prompt: content/research.yaml's template with every placeholder filled."""
    return research["prompt_template"].format(
        object_kind=object_kind, object_label=object_label, object_key=research["object_key"],
        question=question.strip() or research["default_question"],
        next_action=next_action.strip() or "(not decided yet)", demo_state=demo_state)


class ResearchRoom(pn.viewable.Viewer):
    """Pick an object, write a question and a next action, copy a grounded prompt."""

    research = param.Dict(default={}, doc="content/research.yaml.")
    demo_state = param.Callable(default=lambda: "", doc="The demo's settings as one short line.")
    kind = param.String(default="concept", doc="The kind of object the question is about.")
    object_label = param.String(default="", doc="Which object of that kind.")
    prompt = param.String(default="", doc="The copy-ready prompt.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        r = self.research
        self.kind_select = pn.widgets.Select.from_param(
            self.param.kind, label="Kind of object", width=220,
            options={k["label"]: k["kind"] for k in r["object_kinds"]})
        self.object_input = pn.widgets.TextInput.from_param(
            self.param.object_label, label="Object", sizing_mode="stretch_width")
        self.draft = DraftEditor(default_question=r["default_question"],
                                 storage_key=f"serving-lab:research:{r['object_key']}",
                                 sizing_mode="stretch_width", css_classes=["research-draft"])
        self.draft.param.watch(lambda *_: self.refresh(), ["question", "next_action"])
        self.copy_box = CopyBox(sizing_mode="stretch_width", css_classes=["research-prompt"])
        lists = "".join(
            f"**{title}**\n\n" + "\n".join(f"- {item}" for item in r[key]) + "\n\n"
            for title, key in (("Evidence to gather", "evidence"),
                               ("What would settle it", "resolution")))
        self._layout = pn.Column(
            pn.pane.Markdown(r["intro"], sizing_mode="stretch_width"),
            pn.Row(self.kind_select, self.object_input, sizing_mode="stretch_width"),
            pn.pane.Markdown(f"Page key: `{r['object_key']}`", sizing_mode="stretch_width",
                             css_classes=["research-key"]),
            self.draft, pn.pane.Markdown(lists, sizing_mode="stretch_width"),
            pn.pane.Markdown("**Copy-ready prompt**", sizing_mode="stretch_width"),
            self.copy_box, sizing_mode="stretch_width", css_classes=["research-room"],
            name="research")
        self._on_kind()

    def __panel__(self) -> pn.Column:
        return self._layout

    @param.depends("kind", watch=True)
    def _on_kind(self) -> None:
        """Suggest an object of the chosen kind (the learner may edit it)."""
        r = self.research
        if self.kind == "concept":
            label = r["object_label"]
        elif self.kind == "demo state":
            label = "demo:" + ",".join(self.demo_state().split())
        else:
            label = next(k["example_key"] for k in r["object_kinds"] if k["kind"] == self.kind)
        self.object_label = label
        self.refresh()

    @param.depends("object_label", watch=True)
    def refresh(self) -> None:
        """Fill the prompt again (also called when the demo's settings change)."""
        self.prompt = fill_prompt(self.research, self.kind, self.object_label,
                                  self.draft.question, self.draft.next_action, self.demo_state())
        self.copy_box.text = self.prompt
