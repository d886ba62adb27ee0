// Line charts in SVG (no library: a few series of a few hundred points each, axes, a legend).
// lineChart({series: [{name, points: [[x, y], ...]}], xLabel, yLabel, yFormat, xFormat})
// returns an <svg> element (class "chart"); draw again with new data to update.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6db5", "#e0822f", "#3c9a5f", "#b8434f", "#7a5bb5", "#6b7b8c"];

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ticks(lo, hi, n = 4) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

const short = (v) => (Math.abs(v) >= 1000 ? `${+(v / 1000).toPrecision(3)}k` : `${+v.toPrecision(3)}`);

export function lineChart({ series, xLabel = "", yLabel = "", yFormat = short, xFormat = short,
  width = 560, height = 220, yMin } = {}) {
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${yLabel}${xLabel ? ` / ${xLabel}` : ""}` });
  const pts = series.flatMap((se) => se.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  const pad = { l: 52, r: 12, t: 28, b: 34 }; // the legend sits in the top band
  const w = width - pad.l - pad.r;
  const hgt = height - pad.t - pad.b;
  svg.dataset.points = String(pts.length);
  if (!pts.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" }, "—"));
    return svg;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = yMin ?? Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { // a flat line: widen the axis (not below yMin, when one is given)
    if (yMin === undefined || yMin === null) y0 -= Math.abs(y0) * 0.1 || 1;
    y1 += Math.abs(y1) * 0.1 || 1;
  }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * w;
  const Y = (y) => pad.t + hgt - ((y - y0) / (y1 - y0)) * hgt;
  for (const v of ticks(y0, y1)) {
    svg.append(s("line", { x1: pad.l, x2: pad.l + w, y1: Y(v), y2: Y(v), class: "chart-grid" }));
    svg.append(s("text", { x: pad.l - 6, y: Y(v) + 4, "text-anchor": "end", class: "chart-tick" }, yFormat(v)));
  }
  for (const v of ticks(x0, x1, 5)) {
    svg.append(s("text", { x: X(v), y: pad.t + hgt + 16, "text-anchor": "middle", class: "chart-tick" }, xFormat(v)));
  }
  svg.append(s("line", { x1: pad.l, x2: pad.l + w, y1: pad.t + hgt, y2: pad.t + hgt, class: "chart-axis" }));
  if (xLabel) svg.append(s("text", { x: pad.l + w / 2, y: height - 4, "text-anchor": "middle", class: "chart-label" }, xLabel));
  if (yLabel) svg.append(s("text", { x: 12, y: pad.t + hgt / 2, "text-anchor": "middle", class: "chart-label",
    transform: `rotate(-90 12 ${pad.t + hgt / 2})` }, yLabel));
  let legendX = pad.l;
  series.forEach((se, i) => {
    const color = se.color || COLORS[i % COLORS.length];
    // legend: a swatch and the name, each entry after the previous one (width from its length:
    // an SVG text cannot be measured before it is in the page)
    svg.append(s("rect", { x: legendX, y: 7, width: 12, height: 4, rx: 1, fill: color }));
    svg.append(s("text", { x: legendX + 16, y: 14, class: "chart-legend", fill: color }, se.name));
    legendX += 16 + se.name.length * 6.6 + 18;
    const good = se.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (!good.length) return;
    const d = good.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(s("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "chart-line", "data-series": se.name }));
    if (good.length === 1) svg.append(s("circle", { cx: X(good[0][0]), cy: Y(good[0][1]), r: 3, fill: color }));
  });
  return svg;
}
