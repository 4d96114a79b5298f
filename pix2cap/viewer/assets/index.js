// pix2cap report index: sort the thumbnail grid by a per-image score; arrow keys move between
// cards, Enter opens one. The cards are static HTML; this only reorders them.
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  var select = document.getElementById("sort-key");
  var direction = document.getElementById("sort-direction");
  if (!grid || !select) return;
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));

  function value(card, key) {
    if (key === "order") return parseInt(card.dataset.order, 10);
    var raw = card.getAttribute("data-score-" + key);
    return raw === null || raw === "" ? NaN : parseFloat(raw);
  }

  function sortCards() {
    var key = select.value;
    var sign = direction.value === "desc" ? -1 : 1;
    var sorted = cards.slice().sort(function (a, b) {
      var va = value(a, key);
      var vb = value(b, key);
      // Images without the score go last, whichever the direction.
      if (isNaN(va) && isNaN(vb)) return value(a, "order") - value(b, "order");
      if (isNaN(va)) return 1;
      if (isNaN(vb)) return -1;
      if (va !== vb) return sign * (va - vb);
      return value(a, "order") - value(b, "order");
    });
    sorted.forEach(function (card) {
      grid.appendChild(card);
    });
  }

  select.addEventListener("change", sortCards);
  if (select.value !== "order") sortCards();
  direction.addEventListener("change", sortCards);

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.target && (event.target.tagName === "SELECT" || event.target.tagName === "INPUT")) return;
    var shown = Array.prototype.slice.call(grid.querySelectorAll(".card"));
    var at = shown.indexOf(document.activeElement);
    var step = 0;
    if (event.key === "ArrowRight" || event.key === "n") step = 1;
    else if (event.key === "ArrowLeft" || event.key === "p") step = -1;
    if (!step || !shown.length) return;
    var next = at < 0 ? 0 : Math.min(shown.length - 1, Math.max(0, at + step));
    shown[next].focus();
    event.preventDefault();
  });
})();
