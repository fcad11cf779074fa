// js_on_load of the linked map (explorer/page/ui.py): a click on a point (a task) or on a legend entry (a
// cluster) lights the grid's cells and tokens of that expert or cluster ('explorer-pick') and tells the server
// ('pick'); hovering an expert in the grid's legend or the drill-down rings its points here (a dark outline; the
// size stays, so the labels placed around the points do not move).
const box = () => element.querySelector('.x-map');
const RING = {width: 3, color: '#111'}, PLAIN = {width: 1, color: 'white'};  // marker.line; plots.py draws PLAIN

function pick(experts, name) {
  window.dispatchEvent(new CustomEvent('explorer-pick', {detail: {experts}}));
  box().dataset.picked = name;
  trigger('pick', {name});
}

function draw() {
  const root = box();
  if (!root) return;
  if (!window.Plotly) { setTimeout(draw, 50); return; }
  const data = JSON.parse(root.dataset.payload);
  root._data = data;
  const plot = root.querySelector('.x-plot');
  Plotly.newPlot(plot, data.figure.data, data.figure.layout, {displayModeBar: false, responsive: true});
  plot.on('plotly_click', ev => {
    const p = ev.points[0];
    const pt = (data.points[p.curveNumber] || [])[p.pointNumber];
    if (pt) pick(pt.expert ? [pt.expert] : [], pt.task);
  });
  plot.on('plotly_legendclick', ev => {
    const pts = data.points[ev.curveNumber] || [];
    if (!pts.length) return false;
    const cluster = pts[0].cluster;
    const experts = data.cluster_experts[cluster] || [...new Set(pts.map(p => p.expert).filter(Boolean))];
    pick(experts, cluster);
    return false;  // no hiding: a legend click picks the cluster
  });
  root.dataset.ready = '1';
}

window.addEventListener('explorer-hover', ev => {
  const root = box();
  if (!root || !root._data) return;
  const label = ev.detail;
  const curves = [], widths = [], colours = [];
  let n = 0;
  root._data.points.forEach((pts, i) => {
    if (!pts.length) return;
    const on = pts.map(p => Boolean(label && (p.expert === label || p.cluster === label || p.task === label)));
    n += on.filter(Boolean).length;
    curves.push(i);
    widths.push(on.map(x => (x ? RING : PLAIN).width));
    colours.push(on.map(x => (x ? RING : PLAIN).color));
  });
  Plotly.restyle(root.querySelector('.x-plot'), {'marker.line.width': widths, 'marker.line.color': colours}, curves);
  root.dataset.hovered = label || '';
  root.dataset.hoveredPoints = String(n);
});
draw();
watch('value', draw);
