// Installed by tools/load.py in every page before the page's own scripts run, as window.__lab.
// Panel draws widgets inside shadow roots, so the helpers search through them; the observer
// watches the summary table's shadow root, so a move is timed on the page's own clock.
(() => {
  const lab = window.__lab = {armed: false, actAt: null, doneAt: null, before: null, root: null};
  function deep(sel, root) {
    const hit = root.querySelector(sel);
    if (hit) return hit;
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) { const f = deep(sel, el.shadowRoot); if (f) return f; }
    }
    return null;
  }
  lab.table = () => {
    if (!lab.root || !lab.root.isConnected && !(lab.root.host && lab.root.host.isConnected)) {
      const t = deep('table.summary-table', document);
      lab.root = t ? t.getRootNode() : null;
    }
    const t = lab.root ? lab.root.querySelector('table.summary-table') : null;
    return t ? {text: t.innerText, stale: t.classList.contains('stale')} : null;
  };
  lab.status = () => {
    const host = deep('.run-status', document);
    if (!host) return '';
    const root = host.shadowRoot || host;
    return [...root.children].filter(c => !['STYLE', 'LINK'].includes(c.tagName))
      .map(c => c.innerText).join(' ').trim();
  };
  lab.check = () => {
    if (!lab.armed || lab.actAt === null || lab.doneAt !== null) return lab.doneAt !== null;
    const t = lab.table();
    if (t && !t.stale && t.text !== lab.before) lab.doneAt = performance.now();
    return lab.doneAt !== null;
  };
  lab.arm = () => {
    const t = lab.table();
    lab.before = t ? t.text : null;
    lab.actAt = null; lab.doneAt = null; lab.armed = true;
    if (lab.root && !lab.root.__observed) {
      new MutationObserver(lab.check).observe(lab.root, {subtree: true, childList: true,
                                                         characterData: true, attributes: true});
      lab.root.__observed = true;
    }
  };
  lab.hidePlots = () => {  // --light: keep the DOM and every update, skip drawing the figures
    const walk = root => {
      for (const el of root.querySelectorAll('*')) {
        if (el.classList.contains('bk-Figure')) el.style.display = 'none';
        else if (el.shadowRoot) walk(el.shadowRoot);
      }
    };
    walk(document);
  };
  const act = () => { if (lab.armed && lab.actAt === null) lab.actAt = performance.now(); };
  window.addEventListener('keydown', act, true);
  window.addEventListener('click', act, true);
})();
