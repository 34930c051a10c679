/* modalign explore: the client of one self-contained page. Reads the JSON in #explore-data,
   draws the map with Plotly, and answers hover, click, the pair toggle, the gap slider and (when
   served) the query box. Every number shown was computed in Python; this file only looks up. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("explore-data").textContent);
  var P = D.points, names = D.modalities, off = D.offsets, k = D.options.k;
  var moved = D.shift.moved, movedIdx = names.indexOf(moved);
  var amounts = D.shift.amounts;
  var zeroKey = D.shift.keys[amounts.indexOf(0)], shiftKey = zeroKey;
  var selected = -1, served = null;
  var gd = document.getElementById("map");

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var a in attrs || {}) { e.setAttribute(a, attrs[a]); }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function fmt(v, d) { return (v === null || v === undefined) ? "n/a" : Number(v).toFixed(d || 3); }
  function stateOf(key) { var s = D.states[key]; return s && s.alias ? D.states[s.alias] : s; }
  function modCoords(i) {
    if (i === movedIdx) { return D.shift.xy[shiftKey]; }
    return [P.xy[0].slice(off[i], off[i + 1]), P.xy[1].slice(off[i], off[i + 1])];
  }
  function pointXY(g) {
    var i = P.modality[g];
    if (i === movedIdx) { var c = D.shift.xy[shiftKey]; return [c[0][g - off[i]], c[1][g - off[i]]]; }
    return [P.xy[0][g], P.xy[1][g]];
  }
  function mean(v) { var s = 0; for (var i = 0; i < v.length; i++) { s += v[i]; } return s / v.length; }
  function centroid(i) { var c = modCoords(i); return [mean(c[0]), mean(c[1])]; }
  function label(g) {
    var t = P.text[g] ? " · " + P.text[g] : "";
    return P.id[g] + t;
  }

  // ---------------------------------------------------------------------------- the map
  function modalityTraces() {
    return names.map(function (m, i) {
      var c = modCoords(i), ids = [], txt = [];
      for (var g = off[i]; g < off[i + 1]; g++) { ids.push(g); txt.push(label(g)); }
      return {type: "scatter", mode: "markers", name: m, x: c[0], y: c[1], customdata: ids,
              text: txt, hovertemplate: "%{text}<extra>" + m + "</extra>",
              marker: {color: D.colors[m], size: 6, opacity: 0.75}};
    });
  }
  function pairTrace() {
    var x = [], y = [];
    D.pairs.forEach(function (p) {
      var u = pointXY(p[0]), v = pointXY(p[1]);
      x.push(u[0], v[0], null); y.push(u[1], v[1], null);
    });
    var on = document.getElementById("pairs").checked;
    return {type: "scatter", mode: "lines", name: "positive pairs", x: x, y: y,
            hoverinfo: "skip", visible: on, line: {color: "rgba(80,80,80,0.25)", width: 1}};
  }
  function selectionTrace() {
    var x = [], y = [], sym = [], txt = [];
    if (selected >= 0) {
      var q = pointXY(selected);
      x.push(q[0]); y.push(q[1]); sym.push("star"); txt.push("query " + P.id[selected]);
      twinsOf(selected).forEach(function (t) {
        x.push(t.xy[0]); y.push(t.xy[1]); sym.push("diamond");
        txt.push(t.method + " twin of " + P.id[selected]);
      });
    }
    if (served) { x.push(served.xy[0]); y.push(served.xy[1]); sym.push("x"); txt.push("your query"); }
    return {type: "scatter", mode: "markers", name: "query", x: x, y: y, text: txt,
            hovertemplate: "%{text}<extra></extra>", showlegend: false,
            marker: {symbol: sym, size: 16, color: "#111", line: {color: "#fff", width: 1.5}}};
  }
  function arrow(from, to, color, text) {
    return {x: to[0], y: to[1], ax: from[0], ay: from[1], xref: "x", yref: "y", axref: "x",
            ayref: "y", showarrow: true, arrowhead: 3, arrowsize: 1.4, arrowwidth: 2,
            arrowcolor: color, text: text, font: {color: color}};
  }
  function annotations() {
    var a = names.indexOf(D.pair[0]), b = names.indexOf(D.pair[1]);
    var ca = centroid(a), cb = centroid(b);
    var out = [arrow(cb, ca, "#333", "gap " + D.pair[1] + "→" + D.pair[0])];
    if (selected >= 0) {
      twinsOf(selected).forEach(function (t) {
        out.push(arrow(pointXY(selected), t.xy, "#e07a00", t.method));
      });
    }
    return out;
  }
  function layout() {
    var ex = D.projection.explained || [];
    var ax = function (i) {
      return D.projection.name.toUpperCase() + " " + (i + 1) +
        (ex.length > i ? " (" + (100 * ex[i]).toFixed(1) + "% of variance)" : "");
    };
    return {margin: {l: 50, r: 10, t: 10, b: 45}, hovermode: "closest", dragmode: "pan",
            xaxis: {title: {text: ax(0)}, zeroline: false}, yaxis: {title: {text: ax(1)},
            zeroline: false}, legend: {orientation: "h", y: 1.06}, annotations: annotations(),
            uirevision: "keep"};
  }
  function traces() { return modalityTraces().concat([pairTrace(), selectionTrace()]); }
  function redraw() { return Plotly.react(gd, traces(), layout()); }

  // ---------------------------------------------------------------------------- twins
  function twinsOf(g) {
    var out = [];
    D.twins.forEach(function (t) {
      var j = t.of.indexOf(g);
      if (j >= 0) {
        out.push({method: t.method, modality: t.modality, j: j, set: t,
                  xy: [t.xy[0][j], t.xy[1][j]]});
      }
    });
    return out;
  }

  // ---------------------------------------------------------------------------- panels
  function itemNode(g, score) {
    var li = el("li", {"data-id": P.id[g], "data-index": String(g)});
    if (P.thumb[g]) { li.appendChild(el("img", {src: P.thumb[g], alt: P.id[g]})); }
    var s = el("span", {}, (P.text[g] || P.id[g]));
    li.appendChild(s);
    if (score !== undefined) { li.appendChild(el("small", {}, " " + fmt(score / 1000, 3))); }
    if (selected >= 0 && P.group[g] === P.group[selected]) { li.className = "positive"; }
    li.addEventListener("click", function () { select(g); });
    return li;
  }
  function listRow(table, title, stateKey, nn, score, row) {
    var tr = el("tr", {"data-state": stateKey});
    tr.appendChild(el("th", {}, title));
    names.forEach(function (m) {
      var td = el("td"), ol = el("ol", {"data-state": stateKey, "data-modality": m});
      if (nn) {
        for (var r = 0; r < k; r++) {
          var g = nn[m][row * k + r];
          if (g >= 0) { ol.appendChild(itemNode(g, score ? score[m][row * k + r] : undefined)); }
        }
      }
      td.appendChild(ol); tr.appendChild(td);
    });
    table.appendChild(tr);
  }
  function renderNeighbours() {
    var box = document.getElementById("neighbours");
    box.textContent = "";
    if (selected < 0 && !served) {
      box.appendChild(el("p", {"class": "hint"}, "Click a point to list its nearest neighbours."));
      return;
    }
    var table = el("table", {"class": "nn"});
    var head = el("tr"); head.appendChild(el("th", {}, ""));
    names.forEach(function (m) { head.appendChild(el("th", {}, "top-" + k + " " + m)); });
    table.appendChild(head);
    if (served) { listRow(table, "your query", "served", served.nn, served.score, 0); }
    if (selected >= 0) {
      var st = stateOf(shiftKey);
      var title = shiftKey === zeroKey ? "native" : st.label;
      listRow(table, title, shiftKey === zeroKey ? "native" : shiftKey, st.nn, st.score,
              selected);
      if (D.states.bridge) {
        listRow(table, D.states.bridge.label, "bridge", D.states.bridge.nn,
                D.states.bridge.score, selected);
      }
      twinsOf(selected).forEach(function (t) {
        var c = t.set.final_cosine[t.j];
        listRow(table, t.method + " twin (" + t.modality + (c === null ? "" : ", cos " + fmt(c, 2)) +
                ")", "twin:" + t.set.name, t.set.nn, t.set.score, t.j);
      });
      box.appendChild(el("p", {"id": "query-line"}, "Query: " + label(selected) + " (" +
                             names[P.modality[selected]] + ")"));
    }
    box.appendChild(table);
  }
  function renderDiagnosis() {
    var box = document.getElementById("diagnosis");
    box.textContent = "";
    var cols = [["shown", stateOf(shiftKey).diagnosis]];
    if (shiftKey !== zeroKey) { cols.unshift(["native", D.states.native.diagnosis]); }
    if (D.states.bridge) { cols.push([D.states.bridge.label, D.states.bridge.diagnosis]); }
    var t = el("table", {"class": "diag"}), head = el("tr");
    head.appendChild(el("th", {}, ""));
    cols.forEach(function (c) { head.appendChild(el("th", {}, c[0])); });
    t.appendChild(head);
    var rows = [["gap " + D.pair.join("–"), function (d) { return fmt(d.gap); }],
                ["separability", function (d) { return fmt(d.separability); }]];
    names.forEach(function (m) {
      rows.push(["uniformity " + m, function (d) { return fmt(d.uniformity[m]); }]);
      rows.push(["cone " + m, function (d) { return fmt(d.cone[m]); }]);
    });
    rows.forEach(function (r) {
      var tr = el("tr", {"data-metric": r[0]}); tr.appendChild(el("th", {}, r[0]));
      cols.forEach(function (c) { tr.appendChild(el("td", {}, r[1](c[1]))); });
      t.appendChild(tr);
    });
    box.appendChild(t);
  }
  function showCard(g) {
    var card = document.getElementById("card");
    card.textContent = "";
    if (P.thumb[g]) { card.appendChild(el("img", {src: P.thumb[g], alt: P.id[g]})); }
    card.appendChild(el("div", {}, names[P.modality[g]] + " · " + P.id[g]));
    if (P.text[g]) { card.appendChild(el("div", {"class": "value"}, P.text[g])); }
  }

  // ---------------------------------------------------------------------------- actions
  function select(g) {
    selected = g;
    renderNeighbours();
    return redraw();
  }
  function setShift(i) {
    shiftKey = D.shift.keys[i];
    document.getElementById("shift").value = String(i);
    document.getElementById("shift-value").textContent = amounts[i] + " × gap";
    renderNeighbours(); renderDiagnosis();
    return redraw();
  }

  function init() {
    var s = document.getElementById("shift");
    s.max = String(amounts.length - 1);
    s.value = String(amounts.indexOf(0));
    s.addEventListener("input", function () { setShift(parseInt(s.value, 10)); });
    document.getElementById("pairs").addEventListener("change", redraw);
    renderNeighbours(); renderDiagnosis();
    Plotly.newPlot(gd, traces(), layout(), {displaylogo: false, responsive: true}).then(function () {
      gd.on("plotly_click", function (ev) {
        var p = ev.points[0];
        if (p && p.customdata !== undefined && p.curveNumber < names.length) { select(p.customdata); }
      });
      gd.on("plotly_hover", function (ev) {
        var p = ev.points[0];
        if (p && p.customdata !== undefined && p.curveNumber < names.length) { showCard(p.customdata); }
      });
      window.modalignExplore.ready = true;
      window.modalignExplore.readyMs = performance.now();
      document.body.setAttribute("data-ready", "1");
    });
    if (D.serve) { initQuery(); }
  }

  // ---------------------------------------------------------------------------- served query
  function initQuery() {
    var form = document.getElementById("query-form");
    form.hidden = false;
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var text = document.getElementById("query-text").value;
      var file = document.getElementById("query-image").files[0];
      var status = document.getElementById("query-status");
      var send = function (body) {
        status.textContent = "encoding…";
        fetch("query", {method: "POST", headers: {"Content-Type": "application/json"},
                        body: JSON.stringify(body)})
          .then(function (r) { return r.json(); })
          .then(function (res) {
            if (res.error) { status.textContent = res.error; return; }
            served = res; status.textContent = "encoded as " + res.modality;
            renderNeighbours(); redraw();
          })
          .catch(function (e) { status.textContent = String(e); });
      };
      if (file) {
        var reader = new FileReader();
        reader.onload = function () { send({modality: "image", image: reader.result}); };
        reader.readAsDataURL(file);
      } else if (text) {
        send({modality: "text", text: text});
      }
    });
  }

  window.modalignExplore = {select: select, setShift: setShift, ready: false, data: D};
  init();
})();
