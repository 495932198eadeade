// Sorting and filtering of the gallery by its items' data-* attributes (also from the URL fragment
// #sort=KEY|asc&class=NAME, so that a view can be linked), a click-to-enlarge view of every tile, and a
// count of the images that failed to load (body data-broken, shown when > 0).
const gallery = document.getElementById('gallery');
function num(el, key){const v = parseFloat(el.getAttribute(key)); return isNaN(v) ? null : v;}
function update(){
  if(!gallery) return;
  const [key, dir] = document.getElementById('sort').value.split('|');
  const cls = document.getElementById('filter').value;
  const items = Array.from(gallery.children);
  items.sort((a, b) => {
    if(key === 'id') return a.dataset.id.localeCompare(b.dataset.id);
    const x = num(a, key), y = num(b, key);
    if(x === null || y === null) return (x === null) - (y === null);
    return dir === 'desc' ? y - x : x - y;});
  for(const it of items){
    it.hidden = cls !== '' && !it.dataset.classes.split(';').includes(cls);
    gallery.appendChild(it);}
}
window.addEventListener('load', () => {
  const broken = Array.from(document.images).filter(i => i.src && (!i.complete || i.naturalWidth === 0)).length;
  document.body.dataset.broken = String(broken);
  if(broken) document.getElementById('broken').textContent = broken + ' image(s) failed to load';
  document.body.dataset.loaded = '1';
});
const params = new URLSearchParams(location.hash.slice(1));
for(const [id, key] of [['sort', 'sort'], ['filter', 'class']]){
  const el = document.getElementById(id);
  if(!el) continue;
  if(params.has(key) && Array.from(el.options).some(o => o.value === params.get(key))) el.value = params.get(key);
  el.addEventListener('change', () => {
    update();
    const s = document.getElementById('sort').value, c = document.getElementById('filter').value;
    history.replaceState(null, '', '#' + new URLSearchParams(c ? {sort: s, class: c} : {sort: s}));});
}
update();
const lightbox = document.getElementById('lightbox');
if(lightbox){
  const big = lightbox.querySelector('img'), text = lightbox.querySelector('p');
  document.addEventListener('click', e => {
    const tile = e.target.closest('.tile img');
    if(tile){big.src = tile.src; text.textContent = tile.alt; lightbox.hidden = false;}
    else if(e.target.closest('#lightbox')){lightbox.hidden = true; big.removeAttribute('src');}
  });
  document.addEventListener('keydown', e => {if(e.key === 'Escape'){lightbox.hidden = true; big.removeAttribute('src');}});
}
