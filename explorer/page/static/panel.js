// js_on_load of the drill-down panel (explorer/page/ui.py): hovering an expert's row or name highlights its
// points on the map.
let last = null;
element.addEventListener('mouseover', ev => {
  const el = ev.target.closest('[data-expert]');
  const label = el ? el.dataset.expert : null;
  if (label === last) return;
  last = label;
  window.dispatchEvent(new CustomEvent('explorer-hover', {detail: label}));
});
