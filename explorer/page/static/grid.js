// js_on_load of the grid (explorer/page/ui.py): draws the payload with the plotly.js the app serves, sends a
// cell click ('cell') and a token click ('strip') to the server, lights the cells and tokens a map pick names,
// and tells the map which expert the pointer is on (legend). Text is only ever set through plotly or
// textContent: the payload's strings are data.
const box = () => element.querySelector('.x-grid');
const hover = label => window.dispatchEvent(new CustomEvent('explorer-hover', {detail: label}));

function draw() {
  const root = box();
  if (!root) return;
  if (!window.Plotly) { setTimeout(draw, 50); return; }
  const data = JSON.parse(root.dataset.payload);
  root._data = data;
  const plot = root.querySelector('.x-plot');
  const fig = data.figure;
  fig.data.push({type: 'scatter', mode: 'markers', x: [], y: [], hoverinfo: 'skip', showlegend: false,
                 marker: {symbol: 'square-open', size: 9, color: '#111', line: {width: 2}}});
  root._hi = fig.data.length - 1;
  Plotly.newPlot(plot, fig.data, fig.layout, {displayModeBar: false, responsive: true});
  plot.on('plotly_click', ev => {
    const p = ev.points[0];
    const ti = Math.round(p.x), li = Math.round(p.y);
    if (data.layers[li] === undefined || data.positions[ti] === undefined) return;
    root.dataset.clicked = data.layers[li] + ',' + data.positions[ti];
    trigger('cell', {run: data.run, layer: data.layers[li], token: data.positions[ti]});
  });
  root.querySelectorAll('.x-key').forEach(k => {
    k.addEventListener('mouseenter', () => hover(k.dataset.label));
    k.addEventListener('mouseleave', () => hover(null));
  });
  root.querySelectorAll('.x-tok').forEach(s => s.addEventListener('click', () => {
    trigger('strip', {run: data.run, token: Number(s.dataset.t)});
  }));
  root.dataset.ready = String(data.run);
}

function light(labels) {
  const root = box();
  if (!root || !root._data) return;
  const data = root._data, xs = [], ys = [];
  data.idx.forEach((row, li) => row.forEach((k, ti) => {
    if (k >= 0 && labels.has(data.names[k])) { xs.push(ti); ys.push(li); }  // -1: a cell not routed
  }));
  Plotly.restyle(root.querySelector('.x-plot'), {x: [xs], y: [ys]}, [root._hi]);
  let n = 0;
  root.querySelectorAll('.x-tok').forEach(s => {
    const on = labels.has(s.dataset.label);
    s.classList.toggle('x-lit', on);
    n += on ? 1 : 0;
  });
  root.dataset.highlighted = String(xs.length);
  root.dataset.litTokens = String(n);
}

window.addEventListener('explorer-pick', ev => {
  const root = box();
  if (!root || !root._data) return;
  const labelOf = root._data.label_of;
  light(new Set(ev.detail.experts.map(e => labelOf[e] ?? e)));
});
draw();
watch('value', draw);
