// pix2cap image page: masks over the image, linked both ways to segments and caption phrases.
//
// The page's data is the inert JSON block #page-data (written by pix2cap.viewer). Everything
// taken from it is put into the page with textContent or as canvas pixels, never as markup:
// a caption is data.
(function () {
  "use strict";

  var HIGHLIGHT_ALPHA = 0.85; // a highlighted mask, whatever the opacity setting
  var DIM_FACTOR = 0.25; // other masks while something is highlighted
  var MAX_STAGE_VH = 45; // the image's height at most, in % of the window's
  var state = { masks: true, opacity: 0.45 };
  var views = [];

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
  }

  function readState() {
    // Settings travel between pages in the URL's hash: #masks=1&opacity=0.45
    var hash = window.location.hash.replace(/^#/, "");
    hash.split("&").forEach(function (pair) {
      var kv = pair.split("=");
      if (kv[0] === "masks") state.masks = kv[1] !== "0";
      if (kv[0] === "opacity") {
        var value = parseFloat(kv[1]);
        if (isFinite(value)) state.opacity = Math.min(1, Math.max(0, value));
      }
    });
  }

  function stateHash() {
    return "#masks=" + (state.masks ? 1 : 0) + "&opacity=" + state.opacity.toFixed(2);
  }

  // ---------------------------------------------------------------------------------------
  // One view: image, mask canvas, box canvas, segment list and captions.
  // ---------------------------------------------------------------------------------------
  function View(data, page, container) {
    this.data = data;
    this.page = page;
    this.segments = data.segments || [];
    this.byIndex = {};
    this.byId = {};
    var self = this;
    this.segments.forEach(function (s) {
      self.byIndex[s.index] = s;
      self.byId[s.id] = s;
    });
    this.hovered = null; // segment ids highlighted by hovering
    this.pinned = null; // segment ids highlighted by a click
    this.indices = null; // Int32Array: segment index per display pixel (0 = void)
    this.edges = null; // Uint8Array: 1 on a segment's border
    this.build(container);
  }

  View.prototype.build = function (container) {
    var data = this.data;
    var page = this.page;
    var section = el("section", "view");
    section.dataset.view = data.name;
    section.appendChild(el("h2", null, data.name));
    (data.notes || []).forEach(function (note) {
      section.appendChild(el("p", "note", note));
    });

    // The image and the info panel stay in sight while the captions below them scroll.
    var pinned = el("div", "pinned");
    var stage = el("div", "stage");
    stage.style.aspectRatio = page.display[1] + " / " + page.display[0];
    var aspect = page.display[1] / page.display[0];
    stage.style.width = "min(100%, calc(" + MAX_STAGE_VH + "vh * " + aspect.toFixed(4) + "))";
    var image = el("img", "photo");
    image.alt = page.title;
    image.src = page.image;
    stage.appendChild(image);
    this.maskCanvas = el("canvas", "masks");
    this.boxCanvas = el("canvas", "boxes");
    [this.maskCanvas, this.boxCanvas].forEach(function (canvas) {
      canvas.width = page.display[1];
      canvas.height = page.display[0];
      stage.appendChild(canvas);
    });
    pinned.appendChild(stage);

    this.info = el("div", "info");
    this.info.textContent = this.segments.length
      ? "Hover a segment, a phrase or a caption box."
      : "No segments in this view.";
    pinned.appendChild(this.info);
    section.appendChild(pinned);

    if (this.segments.length) {
      section.appendChild(el("h3", null, this.segments.length + " segments"));
      this.list = el("ol", "segments");
      var self = this;
      this.rows = {};
      this.segments.forEach(function (s) {
        var row = el("li", "segment");
        row.dataset.segment = s.id;
        row.tabIndex = 0;
        var swatch = el("span", "swatch");
        swatch.style.background = "rgb(" + s.color.join(",") + ")";
        row.appendChild(swatch);
        var label = s.category + (s.score === null ? "" : " (" + fmt(s.score, 2) + ")");
        row.appendChild(el("span", "label", label));
        if (s.caption) row.appendChild(el("span", "caption", s.caption));
        self.hoverable(row, [s.id]);
        self.rows[s.id] = row;
        self.list.appendChild(row);
      });
      section.appendChild(this.list);
    }

    this.phrases = [];
    if (data.grounded) {
      section.appendChild(el("h3", null, "Grounded caption"));
      var grounded = el("p", "grounded caption-text");
      var view = this;
      data.grounded.forEach(function (piece) {
        if (!piece.phrase) {
          grounded.appendChild(document.createTextNode(piece.text));
          return;
        }
        var span = el("span", "phrase", piece.text);
        span.tabIndex = 0;
        span.dataset.segments = piece.segments.join(" ");
        var first = view.byId[piece.segments[0]];
        if (first) {
          span.style.borderBottomColor = "rgb(" + first.color.join(",") + ")";
          span.style.background = "rgba(" + first.color.join(",") + ",0.18)";
        } else {
          span.classList.add("unlinked");
        }
        view.hoverable(span, piece.segments);
        view.phrases.push(span);
        grounded.appendChild(span);
      });
      section.appendChild(grounded);
    }

    this.boxPieces = [];
    if (data.panoptic) {
      section.appendChild(el("h3", null, "Panoptic caption"));
      var panoptic = el("p", "panoptic caption-text");
      var owner = this;
      data.panoptic.forEach(function (piece) {
        if (piece.box === null || piece.box === undefined) {
          panoptic.appendChild(document.createTextNode(piece.text));
          return;
        }
        var span = el("span", piece.literal ? "box-literal" : "box-phrase", piece.text);
        span.tabIndex = 0;
        span.dataset.box = piece.box;
        owner.boxHoverable(span, piece);
        owner.boxPieces.push(span);
        panoptic.appendChild(span);
      });
      section.appendChild(panoptic);
    }

    container.appendChild(section);
    this.section = section;
    this.bindCanvas();
    this.loadMasks();
  };

  View.prototype.loadMasks = function () {
    if (!this.data.masks) return;
    var self = this;
    var source = new Image();
    source.onload = function () {
      var w = self.maskCanvas.width;
      var h = self.maskCanvas.height;
      var scratch = document.createElement("canvas");
      scratch.width = w;
      scratch.height = h;
      var ctx = scratch.getContext("2d");
      ctx.drawImage(source, 0, 0, w, h);
      var rgba = ctx.getImageData(0, 0, w, h).data;
      var indices = new Int32Array(w * h);
      for (var i = 0; i < w * h; i++) {
        indices[i] = rgba[4 * i] + 256 * rgba[4 * i + 1] + 65536 * rgba[4 * i + 2];
      }
      var edges = new Uint8Array(w * h);
      for (var y = 0; y < h; y++) {
        for (var x = 0; x < w; x++) {
          var p = y * w + x;
          var v = indices[p];
          if (v === 0) continue;
          if (
            (x > 0 && indices[p - 1] !== v) ||
            (x < w - 1 && indices[p + 1] !== v) ||
            (y > 0 && indices[p - w] !== v) ||
            (y < h - 1 && indices[p + w] !== v)
          ) {
            edges[p] = 1;
          }
        }
      }
      self.indices = indices;
      self.edges = edges;
      self.render();
      document.body.dataset.masksLoaded = String(
        (parseInt(document.body.dataset.masksLoaded || "0", 10) || 0) + 1
      );
    };
    source.onerror = function () {
      console.error("pix2cap viewer: the masks of view " + self.data.name + " cannot be read");
    };
    source.src = this.data.masks;
  };

  View.prototype.highlighted = function () {
    return this.hovered || this.pinned || [];
  };

  View.prototype.render = function () {
    if (!this.indices) return;
    var w = this.maskCanvas.width;
    var h = this.maskCanvas.height;
    var ctx = this.maskCanvas.getContext("2d");
    var out = ctx.createImageData(w, h);
    var pixels = out.data;
    var lit = {};
    var highlighted = this.highlighted();
    var self = this;
    highlighted.forEach(function (id) {
      var s = self.byId[id];
      if (s) lit[s.index] = true;
    });
    var anyLit = highlighted.length > 0;
    // Per segment index: its colour and alpha (0-255) for inside and border pixels.
    var table = [null];
    this.segments.forEach(function (s) {
      var on = lit[s.index] === true;
      var alpha;
      if (anyLit) alpha = on ? HIGHLIGHT_ALPHA : state.masks ? state.opacity * DIM_FACTOR : 0;
      else alpha = state.masks ? state.opacity : 0;
      var edgeAlpha = on ? 1 : state.masks ? Math.min(1, alpha + 0.35) : 0;
      table[s.index] = {
        color: s.color,
        fill: Math.round(alpha * 255),
        edge: Math.round(edgeAlpha * 255),
        on: on,
      };
    });
    var indices = this.indices;
    var edges = this.edges;
    for (var p = 0; p < indices.length; p++) {
      var entry = table[indices[p]];
      if (!entry) continue;
      var q = 4 * p;
      if (edges[p]) {
        var c = entry.on ? [255, 255, 255] : entry.color;
        pixels[q] = c[0];
        pixels[q + 1] = c[1];
        pixels[q + 2] = c[2];
        pixels[q + 3] = entry.edge;
      } else {
        pixels[q] = entry.color[0];
        pixels[q + 1] = entry.color[1];
        pixels[q + 2] = entry.color[2];
        pixels[q + 3] = entry.fill;
      }
    }
    ctx.putImageData(out, 0, 0);
  };

  View.prototype.segmentAt = function (event) {
    if (!this.indices) return null;
    var rect = this.maskCanvas.getBoundingClientRect();
    var x = Math.floor(((event.clientX - rect.left) / rect.width) * this.maskCanvas.width);
    var y = Math.floor(((event.clientY - rect.top) / rect.height) * this.maskCanvas.height);
    if (x < 0 || y < 0 || x >= this.maskCanvas.width || y >= this.maskCanvas.height) return null;
    return this.byIndex[this.indices[y * this.maskCanvas.width + x]] || null;
  };

  View.prototype.bindCanvas = function () {
    var self = this;
    // The box canvas lies on top; it takes the pointer for both canvases.
    var target = this.boxCanvas;
    target.addEventListener("mousemove", function (event) {
      var s = self.segmentAt(event);
      var ids = s ? [s.id] : null;
      if (String(ids) !== String(self.hovered)) self.setHover(ids);
    });
    target.addEventListener("mouseleave", function () {
      self.setHover(null);
    });
    target.addEventListener("click", function (event) {
      var s = self.segmentAt(event);
      self.pinned = s && String(self.pinned) !== String([s.id]) ? [s.id] : null;
      self.update();
    });
  };

  // Pointer and keyboard alike: hovering or focusing a node turns it on, leaving turns it off.
  function onHover(node, on, off) {
    node.addEventListener("mouseenter", on);
    node.addEventListener("mouseleave", off);
    node.addEventListener("focus", on);
    node.addEventListener("blur", off);
  }

  View.prototype.hoverable = function (node, ids) {
    var self = this;
    onHover(
      node,
      function () {
        self.setHover(ids.slice());
      },
      function () {
        self.setHover(null);
      }
    );
    node.addEventListener("click", function () {
      self.pinned = String(self.pinned) === String(ids) ? null : ids.slice();
      self.update();
    });
  };

  View.prototype.setHover = function (ids) {
    this.hovered = ids && ids.length ? ids : null;
    this.update();
  };

  View.prototype.update = function () {
    var ids = this.highlighted();
    var set = {};
    ids.forEach(function (id) {
      set[id] = true;
    });
    var self = this;
    Object.keys(this.rows || {}).forEach(function (id) {
      self.rows[id].classList.toggle("active", set[id] === true);
    });
    this.phrases.forEach(function (span) {
      var named = span.dataset.segments ? span.dataset.segments.split(" ") : [];
      span.classList.toggle(
        "active",
        named.some(function (id) {
          return set[id] === true;
        })
      );
    });
    this.showInfo(ids);
    this.render();
  };

  View.prototype.showInfo = function (ids) {
    var info = this.info;
    info.textContent = "";
    var shown = ids.map(function (id) {
      return this.byId[id];
    }, this).filter(Boolean);
    if (!shown.length) {
      info.textContent = this.segments.length
        ? "Hover a segment, a phrase or a caption box."
        : "No segments in this view.";
      return;
    }
    shown.forEach(function (s) {
      var line = el("div", "info-line");
      var swatch = el("span", "swatch");
      swatch.style.background = "rgb(" + s.color.join(",") + ")";
      line.appendChild(swatch);
      var head = s.category + (s.isthing ? " (thing)" : " (stuff)");
      line.appendChild(el("strong", null, head));
      var facts = [];
      if (s.score !== null) facts.push("score " + fmt(s.score, 3));
      if (s.box) facts.push("box [" + s.box.join(", ") + "]");
      facts.push("area " + s.area + " px");
      line.appendChild(el("span", "facts", facts.join(" · ")));
      if (s.caption) line.appendChild(el("div", "caption", s.caption));
      info.appendChild(line);
    });
  };

  View.prototype.boxHoverable = function (node, piece) {
    var self = this;
    onHover(
      node,
      function () {
        self.drawBox(piece);
      },
      function () {
        self.drawBox(null);
      }
    );
  };

  View.prototype.drawBox = function (piece) {
    var canvas = this.boxCanvas;
    var ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    var index = piece ? String(piece.box) : null;
    this.boxPieces.forEach(function (span) {
      span.classList.toggle("active", span.dataset.box === index);
    });
    if (!piece) return;
    var b = piece.xyxy;
    var x = b[0] * canvas.width;
    var y = b[1] * canvas.height;
    var w = Math.max(1, (b[2] - b[0]) * canvas.width);
    var h = Math.max(1, (b[3] - b[1]) * canvas.height);
    var line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 200));
    ctx.lineWidth = line + 2;
    ctx.strokeStyle = "rgba(0,0,0,0.85)";
    ctx.strokeRect(x, y, w, h);
    ctx.lineWidth = line;
    ctx.strokeStyle = "rgb(255,221,0)";
    ctx.strokeRect(x, y, w, h);
  };

  // ---------------------------------------------------------------------------------------
  // The page: views, mask controls, keyboard navigation.
  // ---------------------------------------------------------------------------------------
  function neighbours(key) {
    var report = window.PIX2CAP_REPORT;
    if (!report || !report.pages) return {};
    var keys = report.pages.map(function (p) {
      return p.key;
    });
    var at = keys.indexOf(key);
    if (at < 0) return {};
    return {
      prev: at > 0 ? report.pages[at - 1] : null,
      next: at < keys.length - 1 ? report.pages[at + 1] : null,
      position: at + 1,
      total: keys.length,
    };
  }

  function pageHref(entry) {
    // Pages are siblings in pages/; the report lists them relative to its root.
    return entry.page.replace(/^pages\//, "");
  }

  function setupNavigation(page) {
    var nav = neighbours(page.key);
    var prev = document.getElementById("nav-prev");
    var next = document.getElementById("nav-next");
    var where = document.getElementById("nav-position");
    if (nav.prev) prev.href = pageHref(nav.prev);
    else prev.classList.add("disabled");
    if (nav.next) next.href = pageHref(nav.next);
    else next.classList.add("disabled");
    if (nav.position) where.textContent = nav.position + " / " + nav.total;
    [prev, next].forEach(function (link) {
      link.addEventListener("click", function () {
        if (link.href) link.href = link.href.split("#")[0] + stateHash();
      });
    });
    document.addEventListener("keydown", function (event) {
      if (event.altKey || event.ctrlKey || event.metaKey) return;
      if (event.target && event.target.tagName === "INPUT") return;
      var go = null;
      if (event.key === "ArrowRight" || event.key === "n") go = nav.next;
      else if (event.key === "ArrowLeft" || event.key === "p") go = nav.prev;
      if (go) {
        window.location.href = pageHref(go) + stateHash();
        event.preventDefault();
      } else if (event.key === "i" || event.key === "u") {
        window.location.href = document.getElementById("nav-index").getAttribute("href");
      } else if (event.key === "m") {
        setMasks(!state.masks);
      } else if (event.key === "Escape") {
        views.forEach(function (v) {
          v.pinned = null;
          v.hovered = null;
          v.update();
        });
      }
    });
  }

  function setMasks(on) {
    state.masks = on;
    document.getElementById("masks-toggle").checked = on;
    views.forEach(function (v) {
      v.render();
    });
  }

  function setupControls() {
    var toggle = document.getElementById("masks-toggle");
    var opacity = document.getElementById("masks-opacity");
    toggle.checked = state.masks;
    opacity.value = String(Math.round(state.opacity * 100));
    toggle.addEventListener("change", function () {
      setMasks(toggle.checked);
    });
    document.getElementById("masks-all").addEventListener("click", function () {
      setMasks(true);
    });
    document.getElementById("masks-none").addEventListener("click", function () {
      setMasks(false);
    });
    opacity.addEventListener("input", function () {
      state.opacity = parseInt(opacity.value, 10) / 100;
      if (!state.masks) setMasks(true);
      else
        views.forEach(function (v) {
          v.render();
        });
    });
  }

  function pinBelowHeader() {
    var header = document.querySelector("header");
    var height = header ? header.getBoundingClientRect().height : 0;
    document.documentElement.style.setProperty("--header-height", height + "px");
  }

  function main() {
    pinBelowHeader();
    window.addEventListener("resize", pinBelowHeader);
    var block = document.getElementById("page-data");
    var page = JSON.parse(block.textContent);
    readState();
    var container = document.getElementById("views");
    page.views.forEach(function (viewData) {
      views.push(new View(viewData, page, container));
    });
    setupControls();
    setupNavigation(page);
    window.pix2capViews = views; // for inspection from the console
  }

  main();
})();
